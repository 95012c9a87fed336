"""Schema of ``task: sentence-embedding`` recipes: compress a sentence encoder by distillation on real text.

A sentence-embedding recipe gates a pretrained transformers encoder (heads, FFN neurons, residual branches,
residual width), trains the gates to a FLOPs target while distilling from the dense encoder on unlabeled text
(`dynsparse.data.text`), converts the model, fine-tunes the converted model by the same distillation, and
evaluates it on held-out text (embedding cosine to the dense model, a linear probe on a labeled set). The
runner is `dynsparse.recipes.text.run_text_recipe`.

Fields are validated like the image recipes' (`dynsparse.recipes.schema`): unknown keys with close matches,
wrong types, and out-of-range values are `RecipeError`s naming the field and its YAML line.

Example (YAML)::

    task: sentence-embedding
    name: minilm-gates50
    encoder: {pretrained: all-minilm-l6-v2}
    data: {distill: [english-sentences], max_length: 64, batch_size: 32}
    sparsify: {heads: {gate: hard_concrete}, neurons: {gate: hard_concrete}}
    budget: {target: 0.5, warmup: 0.6, lr: 0.01}
    steps: 2500
    finetune_steps: 800
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ..registry import suggest
from .schema import RecipeError, _build

__all__ = [
    "DistillLossSpec",
    "EncoderSpec",
    "TextBudgetSpec",
    "TextDataSpec",
    "TextEvaluateSpec",
    "TextOptimizerSpec",
    "TextRecipe",
    "parse_text_recipe",
]

#: Gated dimensions when a recipe gives no ``sparsify``: the four of issue #7.
DEFAULT_SPARSIFY = {
    d: {"gate": "hard_concrete", "init_drop_rate": 0.01} for d in ("heads", "neurons", "layers", "width")
}


@dataclass(frozen=True)
class EncoderSpec:
    """The dense encoder (teacher, and the student's starting point).

    ``pretrained``: a name of ``dynsparse.pretrained.PRETRAINED`` with transformers weights (``all-minilm-l6-v2``,
    shipped by an installed package); or ``path``: a local directory a transformers ``BertModel`` and its
    tokenizer load from (``save_pretrained`` output; read with ``local_files_only``). One of the two.
    """

    pretrained: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class TextDataSpec:
    """Distillation text: the ``train`` splits of these `dynsparse.data.text` sets (labels never used), at most
    ``max_length`` tokens per sentence; ``train_subset``: a fixed random subset of that many sentences (smoke runs)."""

    distill: tuple[str, ...] = ("english-sentences",)
    max_length: int = 64
    batch_size: int = 16
    train_subset: int | None = None


@dataclass(frozen=True)
class TextBudgetSpec:
    """FLOPs target: kept fraction ``target`` of the encoder FLOPs at 1 x ``flops_tokens`` tokens.

    The target ramps from 1 over the first ``warmup`` fraction of the gate steps; the Lagrange multipliers are
    trained by Adam (maximize) at ``lr``. After training the least likely units are closed until the target holds
    (then reopened, most likely first, while it still holds); ``refill`` also reopens units closed *during*
    training while the target holds (for when the multipliers pushed the model below the target).
    """

    target: float = 0.5
    warmup: float = 0.5
    lr: float = 0.02
    refill: bool = False
    flops_tokens: int = 128


@dataclass(frozen=True)
class TextOptimizerSpec:
    """AdamW: weights at ``lr`` (with ``weight_decay``), gates' ``log_alpha`` at ``gate_lr`` (no decay); the
    fine-tune of the converted model at ``finetune_lr`` (default ``lr``)."""

    lr: float = 1e-4
    gate_lr: float = 0.1
    weight_decay: float = 0.01
    finetune_lr: float | None = None


@dataclass(frozen=True)
class DistillLossSpec:
    """``(1 - cos(sentence embeddings)) + w_tok * (1 - token cosine) + w_layer * layer-wise token cosine loss``."""

    w_tok: float = 1.0
    w_layer: float = 0.0


@dataclass(frozen=True)
class TextEvaluateSpec:
    """Held-out evaluation after training.

    ``held_out``: the text set whose ``test`` split gives ``sentences`` sentences (a fixed random subset) for the
    cosine of the compressed model's embeddings to the dense model's. ``probe``: a labeled text set; a
    logistic-regression probe (``C = probe_c``) on the embeddings of ``probe_train`` training texts (0 = all)
    is tested on ``probe_test`` test texts (0 = all); null skips the probe. ``latency``: CPU latency of the dense
    and the converted model at 1 x ``budget.flops_tokens`` tokens on ``threads`` threads, ``rounds`` rounds.
    """

    held_out: str = "english-sentences"
    sentences: int = 1000
    max_length: int = 128
    probe: str | None = "rotten-tomatoes"
    probe_train: int = 2000
    probe_test: int = 0
    probe_c: float = 1.0
    batch_size: int = 64
    latency: bool = True
    rounds: int = 15
    threads: int = 1


@dataclass(frozen=True)
class TextRecipe:
    """A ``task: sentence-embedding`` recipe.

    ``steps`` gate-training steps, then ``finetune_steps`` distillation steps of the converted model (both of
    ``data.batch_size`` sentences). ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for training and the
    embeddings (conversion, FLOPs, the saved model and latency are on the CPU). ``checkpoint_every``: also write
    a step-exact checkpoint every that many steps within a stage (0: only at the end of each stage).
    """

    name: str
    task: Literal["sentence-embedding"] = "sentence-embedding"
    encoder: EncoderSpec = field(default_factory=lambda: EncoderSpec(pretrained="all-minilm-l6-v2"))
    data: TextDataSpec = field(default_factory=TextDataSpec)
    sparsify: dict[str, Any] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SPARSIFY.items()})
    budget: TextBudgetSpec = field(default_factory=TextBudgetSpec)
    optimizer: TextOptimizerSpec = field(default_factory=TextOptimizerSpec)
    loss: DistillLossSpec = field(default_factory=DistillLossSpec)
    steps: int = 300
    finetune_steps: int = 150
    evaluate: TextEvaluateSpec = field(default_factory=TextEvaluateSpec)
    device: str = "cpu"
    seed: int = 0
    output_dir: str = "runs/sentence-embedding"
    checkpoint_every: int = 0
    log_every: int = 25


def _fail(lines: dict[str, int], path: str, msg: str) -> None:
    line = f" (line {lines[path]})" if path in lines else ""
    raise RecipeError(f"{path}{line}: {msg}")


def parse_text_recipe(data: dict[str, Any], lines: dict[str, int] | None = None) -> TextRecipe:
    """Validate plain data of a sentence-embedding recipe and return a `TextRecipe`.

    Args:
        data: The recipe as nested dicts and lists (``task`` may be left out).
        lines: Optional ``{field path: line}`` from the YAML loader, used in error messages.

    Raises:
        RecipeError: a field is unknown (with close matches), missing, of the wrong type or out of range.
    """
    lines = lines or {}
    r = _build(TextRecipe, data, "", lines)
    from ..data.text import TEXT_DATASETS
    from .device import check_device

    check_device(r.device, "device" + (f" (line {lines['device']})" if "device" in lines else ""))
    _check_encoder(r.encoder, lines)
    if not r.data.distill:
        _fail(lines, "data.distill", "name at least one text set to distil on")
    for i, name in enumerate(r.data.distill):
        if name not in TEXT_DATASETS:
            _fail(
                lines,
                f"data.distill[{i}]",
                f"unknown text set {name!r}.{suggest(name, list(TEXT_DATASETS))} Known: {', '.join(TEXT_DATASETS)}",
            )
        if name in r.data.distill[:i]:
            _fail(lines, f"data.distill[{i}]", f"{name!r} is named twice (its sentences would be distilled on twice)")
    for key, name in (("evaluate.held_out", r.evaluate.held_out), ("evaluate.probe", r.evaluate.probe)):
        if name is not None and name not in TEXT_DATASETS:
            _fail(
                lines,
                key,
                f"unknown text set {name!r}.{suggest(name, list(TEXT_DATASETS))} Known: {', '.join(TEXT_DATASETS)}",
            )
    if r.evaluate.probe == "english-sentences":
        _fail(lines, "evaluate.probe", "'english-sentences' has no labels; probe on a labeled set (rotten-tomatoes)")
    positive = {
        "data.max_length": r.data.max_length,
        "data.batch_size": r.data.batch_size,
        "budget.flops_tokens": r.budget.flops_tokens,
        "evaluate.sentences": r.evaluate.sentences,
        "evaluate.max_length": r.evaluate.max_length,
        "evaluate.batch_size": r.evaluate.batch_size,
        "evaluate.rounds": r.evaluate.rounds,
        "evaluate.threads": r.evaluate.threads,
        "log_every": r.log_every,
    }
    if r.data.train_subset is not None:
        positive["data.train_subset"] = r.data.train_subset
    for key, v in positive.items():
        if v < 1:
            _fail(lines, key, f"must be >= 1, got {v}")
    nonneg = {
        "steps": r.steps,
        "finetune_steps": r.finetune_steps,
        "checkpoint_every": r.checkpoint_every,
        "evaluate.probe_train": r.evaluate.probe_train,
        "evaluate.probe_test": r.evaluate.probe_test,
        "loss.w_tok": r.loss.w_tok,
        "loss.w_layer": r.loss.w_layer,
        "optimizer.weight_decay": r.optimizer.weight_decay,
    }
    for key, v in nonneg.items():
        if v < 0:
            _fail(lines, key, f"must be >= 0, got {v}")
    if r.steps < 1:
        _fail(lines, "steps", f"the gates need at least one training step, got {r.steps}")
    if not 0 < r.budget.target <= 1:
        _fail(lines, "budget.target", f"the kept fraction of the FLOPs must be in (0, 1], got {r.budget.target}")
    if not 0 <= r.budget.warmup <= 1:
        _fail(lines, "budget.warmup", f"a fraction of the gate steps in [0, 1], got {r.budget.warmup}")
    for key, v in (
        ("optimizer.lr", r.optimizer.lr),
        ("optimizer.gate_lr", r.optimizer.gate_lr),
        ("budget.lr", r.budget.lr),
        ("evaluate.probe_c", r.evaluate.probe_c),
        *([("optimizer.finetune_lr", r.optimizer.finetune_lr)] if r.optimizer.finetune_lr is not None else []),
    ):
        if not v > 0:
            _fail(lines, key, f"must be > 0, got {v}")
    if r.data.train_subset is not None and r.data.train_subset < r.data.batch_size:
        _fail(
            lines,
            "data.train_subset",
            f"{r.data.train_subset} sentences make no batch of {r.data.batch_size} (data.batch_size)",
        )
    _check_sparsify(r.sparsify, lines)
    return r


def _check_encoder(spec: EncoderSpec, lines: dict[str, int]) -> None:
    if (spec.pretrained is None) == (spec.path is None):
        _fail(lines, "encoder", "give exactly one of pretrained (a registered name) or path (a local directory)")
    if spec.pretrained is not None:
        from ..pretrained import PRETRAINED

        names = [n for n in PRETRAINED.names() if PRETRAINED.get(n).library == "transformers"]
        if spec.pretrained not in names:
            _fail(
                lines,
                "encoder.pretrained",
                f"unknown sentence encoder {spec.pretrained!r}."
                f"{suggest(spec.pretrained, names)} Known: {', '.join(names)}",
            )
    elif spec.path is not None:
        import os

        full = os.path.expanduser(spec.path)  # as the encoder is read
        if not os.path.isdir(full):
            shown = repr(spec.path) + (f" ({full})" if full != spec.path else "")
            _fail(lines, "encoder.path", f"directory {shown} does not exist")


def _check_sparsify(spec: dict[str, Any], lines: dict[str, int]) -> None:
    from ..sparsify import _parse_spec

    try:
        parsed = _parse_spec(spec)
    except ConfigError as e:
        _fail(lines, "sparsify", str(e))
    for dim, opts in parsed.items():
        gate = opts.get("gate", "hard_concrete")
        if gate != "hard_concrete":
            _fail(
                lines,
                f"sparsify.{dim}.gate",
                f"the sentence-embedding recipe trains hard-concrete gates to the FLOPs target; got {gate!r}",
            )
        if dim not in ("heads", "neurons", "layers", "width"):
            _fail(lines, f"sparsify.{dim}", "a sentence encoder is gated on heads, neurons, layers or width")


def sparsify_spec(recipe: TextRecipe) -> dict[str, dict[str, Any]]:
    """The recipe's ``sparsify`` as a ``dynsparse.sparsify_`` spec, every gate hard-concrete."""
    from ..sparsify import _parse_spec

    return {d: {"gate": "hard_concrete", **o} for d, o in _parse_spec(recipe.sparsify).items()}

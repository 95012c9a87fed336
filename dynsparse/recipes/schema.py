"""Recipe schema: frozen dataclasses, validated from plain data with errors that name the field and line.

A recipe is a model, a data set and a sequence of stages (dense warm-up, learned gates to a FLOPs target,
fine-tuning, ...), then conversion and evaluation. YAML is read only at the edge (`loader.py`); everything
here works on plain dicts, so recipes can also be built in Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import ConfigError, DynsparseError
from ..registry import suggest

__all__ = [
    "ConvertSpec",
    "DataSpec",
    "DistillSpec",
    "EvaluateSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PruneSpec",
    "Recipe",
    "RegularizerSpec",
    "ScheduleSpec",
    "StageSpec",
    "parse_recipe",
]


class RecipeError(ConfigError):
    """A recipe field is unknown, missing or of the wrong type; names the field path and the line."""


@contextlib.contextmanager
def naming_field(field: str) -> Iterator[None]:
    """Re-raise a library error (a `DynsparseError` but a `RecipeError`) as a `RecipeError` naming the recipe
    ``field`` whose action failed: a stage's action fails when the stage starts, long after the recipe loaded."""
    try:
        yield
    except RecipeError:
        raise
    except DynsparseError as e:
        raise RecipeError(f"{field}: {e}") from e


@dataclass(frozen=True)
class ModelSpec:
    """The model: a timm name with kwargs, or a dynsparse built-in (``library: dynsparse``).

    ``pretrained`` names weights that an installed package ships (``dynsparse.pretrained.PRETRAINED``, e.g.
    ``efficientnet_lite0`` for ``tf_efficientnet_lite0``); without it the weights are random.
    """

    name: str
    library: Literal["timm", "dynsparse"] = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """The data set (see ``dynsparse.data``) and the batch sizes."""

    dataset: str
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    train_subset: int | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class ScheduleSpec:
    name: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class RegularizerSpec:
    """One regularizer of a stage.

    ``name``: ``l0`` (expected L0 of hard-concrete gates), ``budget`` (target-sparsity Lagrangian: ``target``
    kept fraction of ``kind`` flops/params, ``warmup_epochs``, multiplier ``lr``), ``group_lasso``, ``bn_l1``,
    ``sparse_vd`` (swap Linear/Conv for sparse variational dropout, KL ``weight`` with warm-up epochs
    ``kl_start``..``kl_end``). ``group_lasso`` with ``prox: true`` takes a proximal step after each update
    instead of adding the penalty to the loss. ``dynamic``: ``weight`` × the own losses of the input-dependent
    gates (ratio loss of ``predictor`` token gates, target loss of block routers; each has its own ``weight``).
    """

    name: Literal["l0", "budget", "group_lasso", "bn_l1", "sparse_vd", "dynamic"]
    weight: float = 1.0
    target: float | None = None
    kind: Literal["flops", "params"] = "flops"
    warmup_epochs: float = 0.0
    lr: float = 0.01
    kl_start: float = 0.0
    kl_end: float = 0.0
    prox: bool = False


@dataclass(frozen=True)
class PruneSpec:
    """Pruning in a stage (see ``dynsparse.recipes.pruning``).

    ``method``:

    * ``unstructured`` (``magnitude`` is the same with ``importance: magnitude``): per-weight masks on
      Linear/Conv weights to sparsity ``ratio`` (``scope`` global, per layer or per output row: ``row``, how Wanda
      compares its scores), scored by ``importance`` (a
      name of ``dynsparse.importance.WEIGHT_IMPORTANCES``: magnitude, random, gradient, taylor, obd, snip,
      grasp, synflow, wanda), kept as masks through later stages and made permanent before conversion.
      ``schedule: one_shot`` prunes once, ``at`` the stage's ``start`` (pruning at initialization) or ``end``;
      ``linear`` / ``agp`` (Zhu & Gupta's cubic ramp) raise the sparsity from 0 at ``begin_epoch`` to ``ratio``
      at ``end_epoch`` (default: 3/4 of the stage), every ``frequency`` steps, training in between.
    * ``structured``: whole units, ``dimensions: {channels: 0.5, heads: 0.25}`` (fraction removed), scored by a
      structured importance (magnitude, taylor, activation, apoz, random; a name or ``{name: ..., **kwargs}``)
      over ``calibration_batches`` training batches, ranked per gate (``scope: layer``) or across gates
      (``global``, with ``normalize``), kept counts rounded to ``round_to``, at most ``max_ratio`` per gate.
    * ``bn_scale`` (network slimming: |γ| of the BN before each channel gate; ``ratio`` or ``threshold``) and
      ``group_lasso`` (units whose producer-weight norm fell below ``threshold``).

    ``include`` / ``exclude`` are module fqn globs.
    """

    method: Literal["unstructured", "magnitude", "structured", "bn_scale", "group_lasso"]
    ratio: float | None = None
    importance: str | dict[str, Any] = "magnitude"
    dimensions: dict[str, float] | None = None
    schedule: Literal["one_shot", "linear", "agp"] = "one_shot"
    at: Literal["start", "end"] = "end"
    begin_epoch: float = 0.0
    end_epoch: float | None = None
    frequency: int = 100
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    threshold: float | None = None
    scope: Literal["global", "layer", "row"] = "global"
    normalize: Literal["none", "l2", "mean"] = "none"
    round_to: int = 1
    max_ratio: float | None = None
    min_keep: int = 1
    calibration_batches: int = 8


@dataclass(frozen=True)
class DistillSpec:
    """Distillation from the model as it was at the start of the stage (KL on logits at temperature T)."""

    weight: float = 1.0
    temperature: float = 2.0


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    ``sparsify`` is a ``dynsparse.sparsify_`` spec applied at the start of the stage; ``fix_gates`` freezes
    every gate at the start (static gates to their current keep masks; learned ``threshold`` token gates to
    hard masks at a fixed ``θ``, LTP's second stage); ``enforce_budget`` closes the least likely units at
    the end until the kept cost is at most the ``budget`` target (it can land below it); ``prune_vd`` zeroes
    sparse-VD weights with log α > 3 at the end. ``calibrate`` runs the data pass that ``cats`` / ``dejavu``
    neuron gates and ``threshold`` token gates need (``{batches: 16, at: start, **options}``, see
    `dynsparse.recipes.calibrate`). A stage with ``epochs: 0`` trains nothing: it applies its start and end
    actions and is evaluated and checkpointed once.
    """

    name: str
    epochs: int
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    sparsify: dict[str, Any] | None = None
    regularizers: tuple[RegularizerSpec, ...] = ()
    gate_optimizer: OptimizerSpec | None = None
    distill: DistillSpec | None = None
    fix_gates: bool = False
    enforce_budget: bool = False
    prune_vd: bool = False
    prune: PruneSpec | None = None
    calibrate: dict[str, Any] | None = None


@dataclass(frozen=True)
class ConvertSpec:
    """Conversion after training; ``static: false`` keeps input-dependent gates (tokens) as run-time modules."""

    enabled: bool = True
    atol: float = 1e-4
    static: bool = True


@dataclass(frozen=True)
class EvaluateSpec:
    latency: bool = True
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 1
    rounds: int = 15


@dataclass(frozen=True)
class Recipe:
    """A whole recipe.

    ``device`` is where the trainer runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see `dynsparse.recipes.device`);
    conversion, the saved model and latency are always on the CPU.
    """

    name: str
    model: ModelSpec
    data: DataSpec
    stages: tuple[StageSpec, ...]
    seed: int = 0
    output_dir: str = "runs/recipe"
    baseline: bool = False
    device: str = "cpu"
    convert: ConvertSpec = field(default_factory=ConvertSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _text_number_hint(value: Any) -> str:
    """A hint for text that reads as a number: YAML 1.1 (PyYAML) takes ``1e-3`` without a dot for a string."""
    try:
        number = float(value) if isinstance(value, str) and "e" in value.lower() else None
    except ValueError:
        return ""
    if number is None or not math.isfinite(number):
        return ""
    return f" (YAML reads {value} as text: write it with a dot and a signed exponent, e.g. {number:.1e})"


def _convert(value: Any, tp: Any, path: str, lines: dict[str, int]) -> Any:
    where = f"{path}" + (f" (line {lines[path]})" if path in lines else "")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, lines)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(
            errors[0]
            if len(errors) == 1
            else f"{where}: {value!r} matches none of {', '.join(_type_name(a) for a in args)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices])
            raise RecipeError(f"{where}: {value!r} is not one of {list(choices)}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{path}[{i}]", lines) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, lines)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}{_text_number_hint(value)}")
        if not math.isfinite(value):  # NaN passes every range check (its comparisons are all false)
            raise RecipeError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Any, path: str, lines: dict[str, int]) -> Any:
    where = (path or "recipe") + (f" (line {lines[path]})" if path in lines else "")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            line = f" (line {lines[sub]})" if sub in lines else ""
            raise RecipeError(
                f"unknown field {sub!r}{line}.{suggest(str(key), list(fields))} "
                f"Known fields of {path or 'the recipe'}: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], sub, lines)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required field {(path + '.' if path else '') + name!r}")
    return cls(**kwargs)


def parse_recipe(data: dict[str, Any], lines: dict[str, int] | None = None) -> Recipe:
    """Validate plain recipe data and return a `Recipe`.

    Args:
        data: The recipe as nested dicts and lists.
        lines: Optional ``{field path: line}`` from the YAML loader, used in error messages.

    Raises:
        RecipeError: a field is unknown (with close matches), missing, of the wrong type, out of range, or not used
            by the regularizer or pruning method it belongs to (`dynsparse.recipes.validate`).
    """
    recipe = _build(Recipe, data, "", lines or {})
    if not recipe.stages:
        raise RecipeError("stages: a recipe needs at least one stage")
    from .device import check_device

    check_device(recipe.device, "device" + (f" (line {lines['device']})" if lines and "device" in lines else ""))
    if recipe.data.root is not None:
        import os

        full = os.path.expanduser(recipe.data.root)  # as the data readers expand it
        if not os.path.isdir(full):
            line = f" (line {lines['data.root']})" if lines and "data.root" in lines else ""
            shown = repr(recipe.data.root) + (f" ({full})" if full != recipe.data.root else "")
            raise RecipeError(f"data.root{line}: directory {shown} does not exist")
    if recipe.model.pretrained is not None:
        _check_pretrained(recipe.model, lines or {})
    from .validate import check_prune, check_ranges, check_regularizer

    check_ranges(recipe, lines or {})
    kinds: set[str] = set()  # calibratable gates the model has by each stage
    for i, st in enumerate(recipe.stages):
        p = f"stages[{i}]"
        for j, r in enumerate(st.regularizers):
            check_regularizer(r, f"{p}.regularizers[{j}]", lines or {})
        if st.prune is not None:
            check_prune(st.prune, st.epochs, f"{p}.prune", lines or {})
        if st.sparsify is not None:
            from ..sparsify import _parse_spec

            try:
                _parse_spec(st.sparsify)
            except ConfigError as e:
                raise RecipeError(f"{p}.sparsify: {e}") from None
            from .calibrate import calibration_kinds

            kinds |= calibration_kinds(st.sparsify)
        if st.calibrate is not None:
            from .calibrate import check_calibrate

            check_calibrate(st.calibrate, kinds, f"{p}.calibrate", lines or {})
    return recipe


def _check_pretrained(spec: ModelSpec, lines: dict[str, int]) -> None:
    """The pretrained weights must be registered and made for the recipe's model (the package may be absent)."""
    from ..pretrained import PRETRAINED

    line = f" (line {lines['model.pretrained']})" if "model.pretrained" in lines else ""
    if spec.pretrained not in PRETRAINED:
        raise RecipeError(
            f"model.pretrained{line}: unknown pretrained weights {spec.pretrained!r}."
            f"{suggest(spec.pretrained, PRETRAINED.names())} Known: {', '.join(PRETRAINED.names())}"
        )
    src = PRETRAINED.get(spec.pretrained)
    if spec.library != src.library or spec.name != src.arch:
        raise RecipeError(
            f"model.pretrained{line}: weights {spec.pretrained!r} are for {src.library} model {src.arch!r}, "
            f"not {spec.library} model {spec.name!r}"
        )

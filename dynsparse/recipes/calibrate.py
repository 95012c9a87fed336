"""A stage's ``calibrate:`` field: the data pass that some input-dependent gates need before they work.

Four gates need one (see `CALIBRATIONS`):

* ``cats`` MLP neurons (`dynsparse.layers.neuron_gating.calibrate_neurons_`): activation quantiles -> the
  threshold that keeps a fraction ``keep``. Default ``at: start``: the stage then trains with the calibrated
  gate (an uncalibrated one refuses to run).
* ``dejavu`` MLP neurons (`dynsparse.layers.neuron_gating.train_predictors_`): low-rank predictors trained on
  the dense activations (weighted BCE, host frozen). Default ``at: start``: the stage fine-tunes the network
  under the predictors' choices.
* ``dejavu`` attention heads (``dejavu_heads``, `dynsparse.layers.head_gating.train_head_predictors_`): the
  head predictors, trained on each input's top heads by output norm (host frozen). Default ``at: start``.
* ``threshold`` tokens (`dynsparse.layers.tokens.calibrate_tokens_`): the exact score table behind the ``keep``
  knob. Default ``at: end``: the table of the trained weights. ``keep: k`` calibrates for that budget and leaves
  the gates at it (the converted model then keeps about ``k`` of the tokens); ``init_threshold: true`` (at the
  start, ``k < 1``) sets the learned ``θ`` to the calibrated threshold and returns the gates to it, as LTP's soft stage
  starts in ``benchmarks/token_thresholds_fashion.py``.

``batches`` training batches are read in a seeded order of their own (the same on every rank and on a resumed
run), on the run's device. What a calibration computes is weights and buffers of the model, so it is part of the
checkpoint and of a saved converted model; the budgets it sets are plain attributes and are replayed on resume.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import suggest

__all__ = ["CALIBRATIONS", "calibrate_", "calibration_kinds", "check_calibrate", "harden_thresholds_", "replay_"]

log = logging.getLogger(__name__)

#: Options every calibration takes.
COMMON = ("batches", "at")
AT = ("start", "end", "both")


@dataclass(frozen=True)
class Calibration:
    """One calibratable gate kind: where it sits, its default time, and the options of its function."""

    dimension: str
    gate: str
    at: str
    options: tuple[str, ...]
    function: str


#: The options of `dynsparse.layers.neuron_gating.train_predictors_` a recipe may set (all but ``max_batches``,
#: which is ``batches``; a test keeps this list equal to the signature).
PREDICTOR_OPTIONS = (
    "label",
    "label_keep",
    "epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "patience",
    "holdout",
    "max_rows",
    "seed",
)

#: The options of `dynsparse.layers.head_gating.train_head_predictors_` a recipe may set (the same names; a test
#: keeps this list equal to the signature). With neuron and head predictors in one model, both take them.
HEAD_PREDICTOR_OPTIONS = PREDICTOR_OPTIONS

#: Calibratable gates: name -> `Calibration`.
CALIBRATIONS: dict[str, Calibration] = {
    "cats": Calibration("neurons", "cats", "start", (), "calibrate_neurons_"),
    "dejavu": Calibration("neurons", "dejavu", "start", PREDICTOR_OPTIONS, "train_predictors_"),
    "dejavu_heads": Calibration("heads", "dejavu", "start", HEAD_PREDICTOR_OPTIONS, "train_head_predictors_"),
    "threshold": Calibration("tokens", "threshold", "end", ("keep", "init_threshold"), "calibrate_tokens_"),
}


def calibration_kinds(sparsify: Mapping[str, Any] | None) -> set[str]:
    """Names of `CALIBRATIONS` that a ``ds.sparsify_`` spec installs (from its ``neurons`` / ``heads`` / ``tokens``
    gates)."""
    from ..sparsify import _parse_spec

    if not sparsify:
        return set()
    out = set()
    for dim, opts in _parse_spec(sparsify).items():
        gate = opts.get("gate")
        if isinstance(gate, Mapping):
            gate = gate.get("gate")
        if gate is None and dim == "tokens":
            gate = "cls_attention"
        for name, c in CALIBRATIONS.items():
            if c.dimension == dim and c.gate == gate:
                out.add(name)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_calibrate(spec: Mapping[str, Any], kinds: set[str], where: str, lines: Mapping[str, int]) -> None:
    """Validate a stage's ``calibrate`` mapping for the calibratable gates ``kinds`` the model has by then.

    Raises:
        RecipeError: nothing to calibrate, an unknown option (with close matches), or a bad value; names the
            field and its line.
    """
    from .schema import RecipeError

    def fail(key: str | None, msg: str) -> None:
        path = f"{where}.{key}" if key else where
        line = f" (line {lines[path]})" if path in lines else ""
        raise RecipeError(f"{path}{line}: {msg}")

    if not kinds:
        fail(
            None,
            "nothing to calibrate: by this stage the model has no cats or dejavu neuron gate, no dejavu head gate "
            "and no threshold token gate (add one with sparsify, e.g. {neurons: {gate: cats, keep: 0.5}})",
        )
    known = list(dict.fromkeys([*COMMON, *(o for k in sorted(kinds) for o in CALIBRATIONS[k].options)]))
    for key in spec:
        if key not in known:
            path = f"{where}.{key}"
            line = f" (line {lines[path]})" if path in lines else ""
            raise RecipeError(
                f"unknown field {path!r}{line}.{suggest(str(key), known)} Options for "
                f"{', '.join(sorted(kinds))}: {', '.join(known)}"
            )
    b = spec.get("batches", 16)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        fail("batches", f"training batches to calibrate on, an integer >= 1, got {b!r}")
    at = spec.get("at")
    if at is not None and at not in AT:
        fail("at", f"{at!r} is not one of {list(AT)}.{suggest(str(at), list(AT))}")
    if "keep" in spec and spec["keep"] is not None and not (_number(spec["keep"]) and 0 < spec["keep"] <= 1):
        fail("keep", f"a fraction in (0, 1] (or null: the learned thresholds), got {spec['keep']!r}")
    if "init_threshold" in spec:
        if not isinstance(spec["init_threshold"], bool):
            fail("init_threshold", f"expected true or false, got {spec['init_threshold']!r}")
        if spec["init_threshold"] and spec.get("keep") is None:
            fail("init_threshold", "needs keep: the budget whose calibrated threshold starts the learned one")
        if spec["init_threshold"] and spec.get("keep") == 1:
            fail("init_threshold", "needs a keep below 1: keep 1's threshold is -inf, where θ would get no gradient")
        if spec["init_threshold"] and (at or CALIBRATIONS["threshold"].at) == "end":
            fail("init_threshold", "acts at the start of the stage; set at: start (or both)")
    labels = {"dejavu": ("topk", "positive"), "dejavu_heads": ("norm", "contribution")}
    predictors = [k for k in ("dejavu", "dejavu_heads") if k in kinds]
    if len(predictors) == 2 and "label" in spec:
        fail("label", "the model has neuron and head predictors, whose labels differ: leave label out (the defaults)")
    for kind in predictors:
        if kind == "dejavu":
            from ..layers.neuron_gating import train_predictors_ as fit
        else:
            from ..layers.head_gating import train_head_predictors_ as fit

        defaults = {n: p.default for n, p in inspect.signature(fit).parameters.items()}
        for key in CALIBRATIONS[kind].options:
            if key not in spec:
                continue
            v, d = spec[key], defaults[key]
            if key == "label" and v not in labels[kind]:
                fail(key, f"{v!r} is not one of {list(labels[kind])}")
            elif key == "label_keep" and v is not None and not (_number(v) and 0 < v <= 1):
                fail(key, f"a fraction in (0, 1] (or null: each gate's keep), got {v!r}")
            elif isinstance(d, int) and not isinstance(d, bool) and (isinstance(v, bool) or not isinstance(v, int)):
                fail(key, f"expected an integer, got {v!r}")
            elif isinstance(d, float) and not _number(v):
                fail(key, f"expected a number, got {v!r}")
            elif key in ("epochs", "batch_size", "max_rows") and v < 1:
                fail(key, f"an integer >= 1, got {v!r}")
            elif key == "holdout" and not 0 <= v < 1:
                fail(key, f"a fraction in [0, 1), got {v!r}")


def model_kinds(model: nn.Module) -> list[str]:
    """Names of `CALIBRATIONS` whose gates ``model`` holds, in a fixed order (neurons, heads, then tokens)."""
    from ..gates.head_gates import DejaVuHeadGate
    from ..gates.neuron_gates import CatsGate, DejaVuGate
    from ..gates.tokens import ThresholdTokenGate

    present = {type(m) for m in model.modules()}
    found = [
        ("cats", CatsGate),
        ("dejavu", DejaVuGate),
        ("dejavu_heads", DejaVuHeadGate),
        ("threshold", ThresholdTokenGate),
    ]
    return [
        name
        for name, cls in found
        if any(issubclass(t, cls) and (name != "dejavu" or not issubclass(t, DejaVuHeadGate)) for t in present)
    ]


def _threshold_gates(model: nn.Module) -> list[nn.Module]:
    from ..gates.tokens import ThresholdTokenGate

    return [m for m in model.modules() if isinstance(m, ThresholdTokenGate)]


def _runs(spec: Mapping[str, Any], kind: str, when: str) -> bool:
    at = spec.get("at") or CALIBRATIONS[kind].at
    return at in (when, "both")


def calibrate_(
    model: nn.Module, spec: Mapping[str, Any], when: str, batches: Callable[[], Iterable[Tensor]], *, seed: int = 0
) -> dict[str, float]:
    """Run the stage's calibrations due ``when`` (``"start"`` or ``"end"``) on ``model`` (in place).

    Args:
        model: The model (on the run's device).
        spec: The stage's ``calibrate`` mapping (validated by `check_calibrate`).
        when: ``"start"`` (after the stage's sparsify) or ``"end"`` (after its last epoch).
        batches: Returns a fresh iterable of input batches (at most ``spec["batches"]`` are used).
        seed: Default seed of ``dejavu`` predictor training (the split and the row order).

    Returns:
        Numbers to log: ``dejavu_recall`` (mean held-out recall of the predictors), ``head_recall`` (the same of
        the head predictors), ``cats_threshold`` (mean threshold), ``token_threshold`` (mean threshold of the token
        gates at their final budget).
    """
    from ..layers.head_gating import train_head_predictors_
    from ..layers.neuron_gating import calibrate_neurons_, train_predictors_
    from ..layers.token_setup import calibrate_tokens_

    n = int(spec.get("batches", 16))
    info: dict[str, float] = {}
    for kind in model_kinds(model):
        if not _runs(spec, kind, when):
            continue
        if kind == "cats":
            from ..gates.neuron_gates import CatsGate

            calibrate_neurons_(model, batches(), max_batches=n)
            ts = [float(m.threshold) for m in model.modules() if isinstance(m, CatsGate)]
            info["cats_threshold"] = sum(ts) / len(ts)
        elif kind in ("dejavu", "dejavu_heads"):
            fit, key = {
                "dejavu": (train_predictors_, "dejavu_recall"),
                "dejavu_heads": (train_head_predictors_, "head_recall"),
            }[kind]
            opts = {k: spec[k] for k in CALIBRATIONS[kind].options if k in spec}
            opts.setdefault("seed", seed)
            recall = fit(model, batches(), max_batches=n, **opts)
            info[key] = sum(recall.values()) / len(recall)
        else:
            gates = _threshold_gates(model)
            keep = spec.get("keep")
            xs = [x for _, x in zip(range(n), batches(), strict=False)]
            if keep is not None:
                for g in gates:
                    g.set_budget_(keep)
            calibrate_tokens_(model, xs)
            if when == "start" and spec.get("init_threshold", False):
                with torch.no_grad():
                    for g in gates:
                        g.threshold.copy_(g.theta())
            _set_token_budget(gates, spec, when)
            info["token_threshold"] = sum(float(g.theta()) for g in gates) / len(gates)
        log.info("calibrated %s at the %s of the stage: %s", kind, when, info)
    return info


def _set_token_budget(gates: list[nn.Module], spec: Mapping[str, Any], when: str) -> None:
    keep = spec.get("keep")
    if keep is None:
        return
    back = when == "start" and spec.get("init_threshold", False)
    for g in gates:
        g.set_budget_(None if back else keep)


def replay_(model: nn.Module, spec: Mapping[str, Any], when: str) -> nn.Module:
    """What a calibration leaves outside the state dict (the token gates' budgets), without the data pass.

    A resumed run rebuilds the structure, replays this for every calibration that had run, then loads the
    checkpoint (thresholds, tables, predictors).
    """
    if "threshold" in model_kinds(model) and _runs(spec, "threshold", when):
        _set_token_budget(_threshold_gates(model), spec, when)
    return model


def harden_thresholds_(model: nn.Module) -> nn.Module:
    """LTP's second stage for every ``threshold`` token gate (in place): hard masks (``T = 1e-3``), no penalty,
    ``θ`` frozen. Returns ``model``."""
    for g in _threshold_gates(model):
        g.temperature, g.weight = 1e-3, 0.0
        g.threshold.requires_grad_(False)
    return model

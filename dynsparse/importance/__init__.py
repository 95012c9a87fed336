"""Importance scores: which weights and which units matter. Higher score = more important = kept, everywhere.

Two levels:

* **Per weight** (unstructured): functions returning ``{param_fqn: scores shaped like the weight}`` for the
  ``weight`` of every ``nn.Linear`` / ``nn.Conv2d``: `magnitude`, `random`, `gradient`, `taylor` / `obd`,
  `snip`, `grasp` (returned negated, see there), `synflow`, `wanda`, `movement` / `MovementTracker`.
  `unstructured_masks` turns them into exact-sparsity keep masks for ``dynsparse.prune.apply_masks_`` (or pass
  the scores to ``dynsparse.prune.unstructured_(model, s, importance=scores)``).
* **Per unit** (structured): `Importance` callables ``importance(model, data=None) -> {gate_fqn: (num_units,)}``
  over the gates of a gated model: `MagnitudeImportance`, `RandomImportance`, `TaylorImportance`,
  `ActivationImportance` (mean, APoZ), `LayerImportance` (residual branches). `keep_masks` turns them into keep
  masks for `dynsparse.fix_gates_` (`flops_keep_masks`: to a FLOPs budget, by score per FLOP);
  `dynsparse.convert` then slices the model. The decision ends in the gates.

Registries: `IMPORTANCES` (structured, name -> factory) and `WEIGHT_IMPORTANCES` (per weight, name -> function).

Examples:
    >>> import timm, torch, dynsparse as ds
    >>> from dynsparse.importance import MagnitudeImportance, keep_masks
    >>> model = ds.sparsify_(timm.create_model("test_vit", img_size=32), {"neurons": "fixed"})
    >>> scores = MagnitudeImportance(p=2)(model)
    >>> _ = ds.fix_gates_(model, keep_masks(scores, 0.5, round_to=8))
    >>> small = ds.convert(model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..registry import Registry
from .activation import ActivationImportance, LayerImportance
from .budget import flops_keep_masks
from .gradient import gradient, grasp, obd, snip, synflow, taylor
from .masks import NORMALIZATIONS, keep_masks, unstructured_masks
from .structured import Importance, MagnitudeImportance, RandomImportance, TaylorImportance, unit_weights
from .weights import MovementTracker, magnitude, movement, random, wanda

__all__ = [
    "IMPORTANCES",
    "NORMALIZATIONS",
    "WEIGHT_IMPORTANCES",
    "ActivationImportance",
    "Importance",
    "LayerImportance",
    "MagnitudeImportance",
    "MovementTracker",
    "RandomImportance",
    "TaylorImportance",
    "flops_keep_masks",
    "gradient",
    "grasp",
    "keep_masks",
    "magnitude",
    "make_importance",
    "movement",
    "obd",
    "random",
    "snip",
    "synflow",
    "taylor",
    "unit_weights",
    "unstructured_masks",
    "wanda",
]

#: Structured importances: name -> factory of an `Importance` (``IMPORTANCES.get("taylor")(order=2)``).
IMPORTANCES: Registry[Any] = Registry("importance")
IMPORTANCES.register("magnitude")(MagnitudeImportance)
IMPORTANCES.register("random")(RandomImportance)
IMPORTANCES.register("taylor")(TaylorImportance)
IMPORTANCES.register("activation")(ActivationImportance)
IMPORTANCES.register("layer")(LayerImportance)


@IMPORTANCES.register("apoz")
def _apoz(**kwargs: Any) -> ActivationImportance:
    """``ActivationImportance(kind="apoz", ...)``: 1 - APoZ, higher = keep."""
    return ActivationImportance(kind="apoz", **kwargs)


#: Per-weight scores: name -> function returning ``{param_fqn: scores}``.
WEIGHT_IMPORTANCES: Registry[Any] = Registry("weight importance")
for _name, _fn in {
    "magnitude": magnitude,
    "random": random,
    "gradient": gradient,
    "taylor": taylor,
    "obd": obd,
    "snip": snip,
    "grasp": grasp,
    "synflow": synflow,
    "wanda": wanda,
    "movement": movement,
}.items():
    WEIGHT_IMPORTANCES.register(_name)(_fn)
del _name, _fn


def make_importance(spec: str | dict[str, Any] | Importance | Callable[..., Any]) -> Importance | Callable[..., Any]:
    """Build a structured importance from a name, ``{"name": ..., **kwargs}``, or return an `Importance` as is.

    Any other callable ``importance(model, data=None) -> {gate_fqn: (num_units,) scores}`` is returned as it is
    too (the `Importance` contract).

    Examples:
        >>> make_importance({"name": "magnitude", "p": 2})
        MagnitudeImportance(p=2, bias=False, dimensions=('neurons', 'heads', 'channels'))
    """
    from ..errors import ConfigError

    if isinstance(spec, Importance) or (callable(spec) and not isinstance(spec, type)):
        return spec
    if isinstance(spec, str):
        return IMPORTANCES.get(spec)()
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        try:
            return IMPORTANCES.get(spec["name"])(**kwargs)
        except TypeError as e:
            raise ConfigError(f"importance {spec['name']!r}: {e}") from None
    raise ConfigError(
        f"an importance spec is a name, {{'name': ..., **kwargs}}, an Importance or a callable "
        f"importance(model, data=None) -> {{gate_fqn: scores}}, got {spec!r}"
    )

"""Helpers shared by the regularizers: walk the gate slots of gated layers, guard a minimum of kept units."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gates.functional import topk_mask
from ..layers.base import GatedLayer
from ..layers.slot import GateSlot
from ..modules import join_fqn
from ..registry import suggest

__all__ = [
    "UNIT_DIMENSIONS",
    "SlotRef",
    "check_dimensions",
    "check_min_keep",
    "check_weight",
    "gated_slots",
    "keep_at_least",
    "zero_like_params",
]

#: Static dimensions whose units have producer weights (``layers`` gates sit on whole branches).
UNIT_DIMENSIONS = ("neurons", "heads", "channels")


class SlotRef(NamedTuple):
    """One gate slot of a gated layer: ``gate_fqn`` is what ``fix_gates_`` and ``named_gates`` call the gate."""

    gate_fqn: str
    layer_fqn: str
    layer: nn.Module
    child: str
    slot: GateSlot


def check_dimensions(owner: str, dimensions: Iterable[str]) -> tuple[str, ...]:
    """Validate dimension words against `UNIT_DIMENSIONS`; returns them as a tuple."""
    if isinstance(dimensions, str):
        dimensions = (dimensions,)
    dims = tuple(dimensions)
    if not dims:
        raise ConfigError(f"{owner}: dimensions must name at least one of {UNIT_DIMENSIONS}")
    for d in dims:
        if d not in UNIT_DIMENSIONS:
            raise ConfigError(
                f"{owner}: unknown dimension {d!r}.{suggest(str(d), UNIT_DIMENSIONS)} "
                f"Known: {', '.join(UNIT_DIMENSIONS)}"
            )
    return dims


def gated_slots(model: nn.Module, dimensions: Iterable[str]) -> Iterator[SlotRef]:
    """Every gate slot of every `GatedLayer` of ``model`` whose dimension is in ``dimensions``, in module order."""
    dims = set(dimensions)
    for fqn, module in model.named_modules():
        if not isinstance(module, GatedLayer):
            continue
        for child, slot in module.gate_slots():
            if slot.dimension in dims:
                yield SlotRef(join_fqn(fqn, child, "gate"), fqn, module, child, slot)


def keep_at_least(mask: Tensor, scores: Tensor, min_keep: int) -> Tensor:
    """``mask`` plus the ``min_keep`` highest ``scores`` when it keeps fewer (ties go to the lower index).

    Args:
        mask: (N,) bool keep mask.
        scores: (N,) scores, higher is more important.
        min_keep: Minimum number of kept units (clipped to N).
    """
    k = min(min_keep, mask.numel())
    if int(mask.sum()) >= k:
        return mask
    return mask | topk_mask(scores.detach(), k).to(mask.device)


def check_min_keep(owner: str, min_keep: int) -> int:
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ConfigError(f"{owner}: min_keep must be an int >= 0, got {min_keep!r}")
    return min_keep


def check_weight(owner: str, weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (weight >= 0 and weight < float("inf")):
        raise ConfigError(f"{owner}: weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def zero_like_params(model: nn.Module) -> Tensor:
    """A scalar 0 on the device and dtype of ``model``'s first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return torch.zeros((), device=p.device, dtype=p.dtype)
    return torch.zeros(())

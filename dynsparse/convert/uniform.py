"""``uniform_gates_``: make every layer keep the same number of units, so one config describes the pruned model."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.slot import GateSlot

__all__ = ["keep_top_", "uniform_gates_"]

_UNIT_DIMENSIONS = ("heads", "neurons", "channels")


def uniform_gates_(model: nn.Module, dimensions: Iterable[str] = _UNIT_DIMENSIONS) -> nn.Module:
    """Freeze the unit gates of ``model`` so that gates of one dimension and size keep the same count (in place).

    Gates are grouped by dimension and unit count (all attention layers of a model, all its MLPs, ...). In each
    group every gate keeps ``k`` units, ``k`` the mean kept count rounded: its best units, ranked by keep mask,
    then eval value, then ``expected_keep()``. Kept units keep their eval value (1 where it was 0). Branch gates
    (``layers``) are not touched. Gates become `dynsparse.gates.FixedGate`.

    Args:
        model: A gated model.
        dimensions: Dimensions to equalize.

    Returns:
        ``model``.

    Raises:
        ConfigError: an unknown dimension.

    Examples:
        >>> import timm, torch, dynsparse as ds
        >>> from dynsparse.convert.uniform import uniform_gates_
        >>> m = ds.sparsify_(timm.create_model("test_vit"), {"heads": "fixed"})
        >>> masks = {f: torch.arange(g.num_units) < i + 1 for i, (f, g) in enumerate(ds.named_gates(m))}
        >>> _ = uniform_gates_(ds.fix_gates_(m, masks))
        >>> sorted({int(g.keep_mask().sum()) for _, g in ds.named_gates(m)})
        [2]
    """
    from ..gates import Gate

    dims = tuple(dimensions)
    bad = [d for d in dims if d not in _UNIT_DIMENSIONS]
    if bad:
        raise ConfigError(f"uniform_gates_: dimension {bad[0]!r} has no units to equalize (known: {_UNIT_DIMENSIONS})")
    groups: dict[tuple[str, int], list[GateSlot]] = defaultdict(list)
    for _, m in model.named_modules():
        if isinstance(m, GateSlot) and m.dimension in dims and isinstance(m.gate, Gate):
            groups[(m.dimension, m.gate.num_units)].append(m)
    for slots in groups.values():
        kept = [int(s.gate.keep_mask().sum()) for s in slots]
        k = round(sum(kept) / len(kept))
        for s in slots:
            keep_top_(s, k)
    from ..integrations.tables import round_width_

    round_width_(model)
    return model


def keep_top_(slot: GateSlot, k: int) -> GateSlot:
    """Freeze the gate of ``slot`` to keep its ``k`` best units (in place): ranked by keep mask, then eval value,
    then ``expected_keep()``. Kept units keep their eval value (1 where it was 0)."""
    from ..gates import FixedGate

    old = slot.gate
    n = old.num_units
    with torch.no_grad():
        values = old.eval_values().detach().clamp(min=0)
        score = old.keep_mask().to(values.dtype) * 4 + values * 2 + old.expected_keep().detach().to(values)
        order = torch.argsort(score, descending=True, stable=True)
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        mask[order[:k]] = True
        values = torch.where(values > 0, values, torch.ones_like(values))
    slot.gate = FixedGate(n, mask=mask, values=values, device=values.device, dtype=values.dtype).train(old.training)
    return slot

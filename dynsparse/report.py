"""``sparsity_report``: units kept per dimension and an estimate of the FLOPs kept."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor, nn

from .flops import CostModel, default_input
from .gates import Gate

__all__ = ["DimensionRow", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class DimensionRow:
    """Units kept of one dimension, summed over its gates."""

    dimension: str
    gates: int
    kept: int
    total: int

    @property
    def keep_ratio(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass
class SparsityReport:
    """Result of `sparsity_report`; ``str(report)`` renders a table.

    Attributes:
        rows: One `DimensionRow` per gated dimension.
        per_gate: ``{gate_fqn: (kept, total)}``.
        dense_flops: FLOPs of one forward pass of the ungated model on the example input (None if not measured).
        kept_flops: Estimated FLOPs once the closed units are removed (None if not measured).
    """

    rows: list[DimensionRow] = field(default_factory=list)
    per_gate: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_flops: int | None = None
    kept_flops: float | None = None

    @property
    def flops_keep_ratio(self) -> float | None:
        if self.dense_flops is None or self.kept_flops is None or self.dense_flops == 0:
            return None
        return self.kept_flops / self.dense_flops

    def __str__(self) -> str:
        lines = [f"{'dimension':<10} {'gates':>6} {'kept':>8} {'total':>8} {'kept %':>7}"]
        for r in self.rows:
            lines.append(f"{r.dimension:<10} {r.gates:>6} {r.kept:>8} {r.total:>8} {100 * r.keep_ratio:>6.1f}%")
        if self.flops_keep_ratio is not None:
            lines.append(
                f"FLOPs: {_si(self.kept_flops)} of {_si(self.dense_flops)} kept "
                f"({100 * self.flops_keep_ratio:.1f}%, estimate from the gates' keep masks)"
            )
        return "\n".join(lines)


def sparsity_report(model: nn.Module, example_input: Tensor | tuple | None = None) -> SparsityReport:
    """Units kept / total per dimension, and the estimated fraction of FLOPs kept.

    The FLOPs estimate runs the model once on ``example_input`` (default: a zero image of the timm model's
    ``input_size``) under ``torch.utils.flop_counter``, then scales each module's FLOPs by the kept fraction
    of every gate whose scope covers it (a product where two gates meet, e.g. a conv between two gated
    channel sets). Non-binary eval gate values count as kept.

    Args:
        model: A gated model.
        example_input: Input of one forward pass, or a tuple of positional inputs.

    Returns:
        A `SparsityReport`; print it for a table.
    """
    from .layers.slot import GateSlot

    report = SparsityReport()
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for fqn, module in model.named_modules():
        if not isinstance(module, GateSlot):
            continue
        gate: Gate = module.gate
        kept, total = int(gate.keep_mask().sum()), gate.num_units
        report.per_gate[f"{fqn}.gate"] = (kept, total)
        row = acc[module.dimension]
        row[0] += 1
        row[1] += kept
        row[2] += total
    order = {d: i for i, d in enumerate(("neurons", "heads", "channels", "layers"))}
    report.rows = [DimensionRow(d, g, k, t) for d, (g, k, t) in sorted(acc.items(), key=lambda i: order.get(i[0], 9))]
    example = example_input if example_input is not None else default_input(model)
    if example is None:
        return report
    cost = CostModel(model, example, kind="flops")
    report.dense_flops = int(cost.total)
    report.kept_flops = cost.fraction() * cost.total
    return report


def _si(n: float) -> str:
    """``n`` in millions with two decimals, or in thousands below a million (a tiny model's FLOPs are not 0.00M)."""
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e6 or n == 0 else f"{n / 1e3:.2f}k"

"""``sparsity_report``: units kept per dimension and an estimate of the FLOPs kept."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import ConfigError
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
                f"FLOPs: {self.kept_flops / 1e6:.2f}M of {self.dense_flops / 1e6:.2f}M kept "
                f"({100 * self.flops_keep_ratio:.1f}%, estimate from the gates' keep masks)"
            )
        return "\n".join(lines)


def _default_input(model: nn.Module) -> Tensor | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        return None
    ref = next(model.parameters(), None)
    return torch.zeros(
        1, *size, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None
    )


def _module_flops(model: nn.Module, example: Tensor | tuple) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        model.train(was_training)
    root = type(model).__name__
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        rel = "" if name == root else name[len(root) + 1 :] if name.startswith(root + ".") else None
        if rel is not None:
            out[rel] = int(sum(ops.values()))
    return out


def _exclusive(totals: dict[str, int]) -> dict[str, int]:
    excl = dict(totals)
    for name, flops in totals.items():
        if name:
            parent = name.rpartition(".")[0]
            if parent in excl:
                excl[parent] -= flops
    return excl


def _covers(scope_path: str, name: str) -> bool:
    return scope_path == "" or name == scope_path or name.startswith(scope_path + ".")


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
    factors: list[tuple[str, float]] = []  # (scope path, kept fraction)
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
        parent = fqn.rpartition(".")[0]
        for s in module.scope:
            factors.append((f"{parent}.{s}".strip(".") if s else parent, kept / total))
    order = {d: i for i, d in enumerate(("neurons", "heads", "channels", "layers"))}
    report.rows = [DimensionRow(d, g, k, t) for d, (g, k, t) in sorted(acc.items(), key=lambda i: order.get(i[0], 9))]
    example = example_input if example_input is not None else _default_input(model)
    if example is None:
        return report
    try:
        totals = _module_flops(model, example)
    except Exception as e:  # the example input does not fit the model
        raise ConfigError(f"sparsity_report: the example input does not run through {type(model).__name__}: {e}") from e
    excl = _exclusive(totals)
    kept_flops = 0.0
    for name, flops in excl.items():
        f = 1.0
        for path, frac in factors:
            if _covers(path, name):
                f *= frac
        kept_flops += flops * f
    report.dense_flops = totals.get("", sum(excl.values()))
    report.kept_flops = kept_flops
    return report

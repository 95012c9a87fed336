"""``sparsity_report``: units kept per dimension and an estimate of the FLOPs kept.

Static gates have a keep mask: their rows count the units kept. Input-dependent gates (tokens, per-input channels
or neurons, block routers) decide per input: they get rows of their own with their run-time budget (``keep``), and
their FLOPs are measured on the example input with the gates deciding, against the same model with every such gate
at ``keep = 1`` (the dense cost).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import Tensor, nn

from .flops import CostModel, default_input
from .gates import Gate, InputDependentGate

__all__ = ["DimensionRow", "InputDependentRow", "SparsityReport", "count_params", "count_weights", "sparsity_report"]


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


@dataclass(frozen=True)
class InputDependentRow:
    """Input-dependent gates of one dimension: no fixed units kept, a budget per input instead.

    Attributes:
        keeps: The distinct ``keep`` budgets of the gates, sorted (``None``: a threshold gate on its learned
            thresholds, which keeps a fraction that depends on the input).
    """

    dimension: str
    gates: int
    units: int
    keeps: tuple[float | None, ...]

    def budget(self) -> str:
        return ", ".join("learned" if k is None else f"{k:g}" for k in self.keeps)


@dataclass
class SparsityReport:
    """Result of `sparsity_report`; ``str(report)`` renders a table.

    Attributes:
        rows: One `DimensionRow` per dimension with static gates.
        per_gate: ``{gate_fqn: (kept, total)}`` of the static gates.
        input_dependent: One `InputDependentRow` per dimension with input-dependent gates.
        per_input_gate: ``{gate_fqn: keep}`` of the input-dependent gates.
        dense_flops: FLOPs of one forward pass of the ungated model on the example input (None if not measured);
            with input-dependent gates, of the model with every one at ``keep = 1`` (their own scoring included).
        kept_flops: Estimated FLOPs once the closed units are removed, with the input-dependent gates deciding on
            the example input (None if not measured).
    """

    rows: list[DimensionRow] = field(default_factory=list)
    per_gate: dict[str, tuple[int, int]] = field(default_factory=dict)
    input_dependent: list[InputDependentRow] = field(default_factory=list)
    per_input_gate: dict[str, float | None] = field(default_factory=dict)
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
        for r in self.input_dependent:
            lines.append(f"{r.dimension:<10} {r.gates:>6} {'per input, budget keep ' + r.budget():>33}")
        if self.flops_keep_ratio is not None:
            how = "estimate from the gates' keep masks"
            if self.input_dependent:
                how = (
                    "static gates from their keep masks, input-dependent gates as they decided on the example "
                    "input; other inputs differ"
                    if self.rows
                    else "input-dependent gates as they decided on the example input; other inputs differ"
                )
            kept, dense = _si(self.kept_flops), _si(self.dense_flops)
            lines.append(f"FLOPs: {kept} of {dense} kept ({100 * self.flops_keep_ratio:.1f}%, {how})")
        return "\n".join(lines)


def sparsity_report(model: nn.Module, example_input: Tensor | tuple | None = None) -> SparsityReport:
    """Units kept / total per dimension, and the estimated fraction of FLOPs kept.

    The FLOPs estimate runs the model once on ``example_input`` (default: a zero image of the timm model's
    ``input_size``) under ``torch.utils.flop_counter``, then scales each module's FLOPs by the kept fraction
    of every gate whose scope covers it (a product where two gates meet, e.g. a conv between two gated
    channel sets). Non-binary eval gate values count as kept.

    Input-dependent gates (token gates, per-input channel or neuron gates, block routers) have no keep mask: they
    are listed per dimension with their budget, and their FLOPs are what they skip on ``example_input`` itself (the
    model runs with them deciding; the dense FLOPs with every one at ``keep = 1``). Pass real inputs, several of
    them, for a representative number: on other inputs such a model spends other FLOPs (`dynsparse.flops.mean_flops`
    averages over inputs one at a time).

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
    order = {d: i for i, d in enumerate(("neurons", "heads", "channels", "tokens", "layers"))}
    report.rows = [DimensionRow(d, g, k, t) for d, (g, k, t) in sorted(acc.items(), key=lambda i: order.get(i[0], 9))]
    dyn: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for fqn, g in model.named_modules():
        if isinstance(g, InputDependentGate):
            report.per_input_gate[fqn] = g.keep
            row = dyn[input_dimension(g)]
            row[0] += 1
            row[1] += g.num_units
            row[2].add(g.keep)
    report.input_dependent = [
        InputDependentRow(d, n, u, tuple(sorted(k, key=lambda v: (v is not None, v or 0.0))))
        for d, (n, u, k) in sorted(dyn.items(), key=lambda i: order.get(i[0], 9))
    ]
    example = example_input if example_input is not None else default_input(model)
    if example is None:
        return report
    cost = CostModel(model, example, kind="flops")  # the input-dependent gates decide on the example input
    report.kept_flops = cost.fraction() * cost.total
    if report.per_input_gate:
        from .flops import count_flops
        from .knob import budget

        with budget(model, 1.0):  # every input-dependent gate keeps everything: the dense cost
            report.dense_flops = count_flops(model, *(example if isinstance(example, tuple) else (example,)))
    else:
        report.dense_flops = int(cost.total)
    return report


def input_dimension(gate: InputDependentGate) -> str:
    """The dimension an input-dependent gate decides over (its class name when none of the known ones)."""
    from .gates.channel_gates import FBSGate
    from .gates.head_gates import DejaVuHeadGate
    from .gates.neuron_gates import NeuronGate
    from .gates.routers import BlockRouter
    from .gates.tokens import TokenGate

    kinds = (
        (TokenGate, "tokens"),
        (FBSGate, "channels"),
        (DejaVuHeadGate, "heads"),  # before NeuronGate: a head predictor is a Deja Vu neuron predictor's subclass
        (NeuronGate, "neurons"),
        (BlockRouter, "layers"),
    )
    return next((d for cls, d in kinds if isinstance(gate, cls)), type(gate).__name__)


def _si(n: float) -> str:
    """``n`` in millions with two decimals, or in thousands below a million (a tiny model's FLOPs are not 0.00M)."""
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e6 or n == 0 else f"{n / 1e3:.2f}k"


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)``, the static gates' own parameters left out.

    A static gate's parameters (hard-concrete ``log_alpha``, ...) only decide what conversion keeps; an
    input-dependent gate (token predictor, router, per-input channel saliency) runs with the model at inference,
    converted or not, so its parameters count.
    """
    from .gate_ops import named_gates

    static = {id(p) for _, g in named_gates(model) if not isinstance(g, InputDependentGate) for p in g.parameters()}
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in static:
            continue
        total += p.numel()
        nonzero += int((p != 0).sum())
    return total, nonzero


def count_weights(model: nn.Module) -> tuple[int, int]:
    """``(weights, non-zero weights)`` of the ``nn.Linear`` / ``nn.Conv2d`` layers: what ``--unstructured`` prunes.

    Biases and norms are left out: they are never pruned, and timm starts its biases at 0; so are the layers of
    gates (token predictors, routers, saliency networks), which pruning never touches.
    """
    from .importance._util import gate_layers
    from .prune.masked import TWINS

    skip = gate_layers(model)
    total = nonzero = 0
    for m in model.modules():
        if type(m) in TWINS and id(m) not in skip:
            total += m.weight.numel()
            nonzero += int((m.weight != 0).sum())
    return total, nonzero

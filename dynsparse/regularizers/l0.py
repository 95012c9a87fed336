"""Expected-L0 penalty of the hard-concrete gates (Louizos, Welling & Kingma 2018), as one loss term.

Each `HardConcreteGate` already returns its expected L0 norm as ``penalty()``:
``E‖z‖₀ = Σ_j sigmoid(log α_j − β·log(−γ/ζ))`` (methods.md 2.17). `ExpectedL0` only sums them over a model
and scales the sum, so the weight means the same thing on models of any size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gate_ops import named_gates
from ..gates import HardConcreteGate
from ._common import check_weight, zero_like_params

__all__ = ["ExpectedL0"]


class ExpectedL0:
    """``λ · Σ_gates E‖z‖₀``, divided by the number of gated units when ``normalize`` is true.

    With ``normalize=True`` the term is ``λ`` times the expected *fraction* of open units, in [0, λ]. With
    ``normalize=False`` it is ``λ`` times the expected *count*: the paper's ``λ·E‖θ‖₀``, where the reference
    code's ``λ`` already includes ``1/N`` (N = dataset size, e.g. λ = 1/N or 0.1/N).

    The gates are looked up at every call, so gates frozen later by ``fix_gates_`` (no longer hard-concrete)
    drop out of the sum and of the count.

    Args:
        model: A model gated with ``"hard_concrete"`` gates.
        weight: ``λ`` (>= 0).
        normalize: Divide by the total number of hard-concrete units.

    Raises:
        ConfigError: a bad weight, or no hard-concrete gate in ``model``.

    Examples:
        >>> import timm, dynsparse as ds
        >>> model = ds.sparsify_(timm.create_model("test_vit"), {"neurons": "hard_concrete"})
        >>> reg = ExpectedL0(model, weight=0.1)
        >>> reg().item() > 0.09   # gates start open: about λ
        True
    """

    def __init__(self, model: nn.Module, weight: float = 1.0, normalize: bool = True) -> None:
        self.model = model
        self.weight = check_weight("ExpectedL0", weight)
        self.normalize = bool(normalize)
        if not self._gates():
            raise ConfigError("ExpectedL0: the model has no HardConcreteGate (sparsify_ with 'hard_concrete' first)")

    def _gates(self) -> list[HardConcreteGate]:
        return [g for _, g in named_gates(self.model) if isinstance(g, HardConcreteGate)]

    def num_units(self) -> int:
        """Total number of units of the model's hard-concrete gates."""
        return sum(g.num_units for g in self._gates())

    def __call__(self) -> Tensor:
        """Scalar ``λ · Σ E‖z‖₀`` (``/ num_units`` when normalised), differentiable w.r.t. every ``log α``.

        Summed in float32 at least: in float16 the count overflowed to inf past 65,504 open units (an LLM's MLPs).
        """
        gates = self._gates()
        if not gates:
            return zero_like_params(self.model)
        terms = [g.penalty() for g in gates]
        total = torch.stack([t.to(torch.promote_types(t.dtype, torch.float32)) for t in terms]).sum()
        if self.normalize:
            total = total / sum(g.num_units for g in gates)
        return self.weight * total

    def __repr__(self) -> str:
        return f"ExpectedL0(weight={self.weight:g}, normalize={self.normalize}, units={self.num_units()})"

"""A stage's regularizer objects, and the sparsity measures the trainer logs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..gate_ops import named_gates
from .schema import RegularizerSpec, StageSpec, naming_field

__all__ = ["build_regularizers", "weight_sparsity"]


def build_regularizers(
    model: nn.Module, st: StageSpec, steps_per_epoch: int, example: Tensor, where: str = "stage"
) -> list[tuple[RegularizerSpec, Any]]:
    """``(spec, object)`` per regularizer of the stage (``None`` for those the trainer computes itself).

    Raises:
        RecipeError: a regularizer has nothing to act on in ``model`` (no hard-concrete gate for ``l0``, no
            input-dependent gate for ``dynamic``, ...), naming its field ``{where}.regularizers[j]``.
    """
    out = []
    for j, r in enumerate(st.regularizers):
        with naming_field(f"{where}.regularizers[{j}]"):
            out.append((r, _regularizer(model, r, steps_per_epoch, example)))
    return out


def _regularizer(model: nn.Module, r: RegularizerSpec, steps_per_epoch: int, example: Tensor) -> Any:
    """The object of one regularizer (``None`` for those the trainer computes itself)."""
    if r.name == "l0":
        from ..regularizers.l0 import ExpectedL0

        obj = ExpectedL0(model, weight=r.weight)
    elif r.name == "budget":
        from ..regularizers.budget import TargetSparsity

        obj = TargetSparsity(
            model,
            r.target,
            kind=r.kind,
            warmup_steps=int(r.warmup_epochs * steps_per_epoch),
            example_input=example,
        )
    elif r.name == "group_lasso":
        from ..regularizers.group_lasso import GroupLasso

        obj = GroupLasso(model, weight=r.weight)
    elif r.name == "bn_l1":
        from ..regularizers.bn_l1 import BNScaleL1

        obj = BNScaleL1(model, weight=r.weight)
    elif r.name == "dynamic":
        from ..gates import InputDependentGate

        gates = [g for _, g in named_gates(model) if isinstance(g, InputDependentGate)]
        if not gates:  # the term would be a constant 0
            raise ConfigError("regularizer 'dynamic': the model has no input-dependent gate (sparsify_ first)")
        obj = _GatePenalty(gates, r.weight)
    else:
        obj = None
    return obj


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of Linear/Conv weights that are zero, or pruned by sparse VD (``log α > 3``)."""
    pruned = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            mask = getattr(m, "weight_mask", None)
            if callable(mask):  # sparse VD: log alpha > 3
                pruned += int((~mask()).sum())
            elif mask is not None:  # a masked layer of dynsparse.prune
                pruned += int((mask == 0).sum())
            else:
                pruned += int((m.weight == 0).sum())
            total += m.weight.numel()
    return pruned / total if total else 0.0


class _GatePenalty:
    """``weight`` × the sum of some gates' own ``penalty()``."""

    def __init__(self, gates: list[nn.Module], weight: float) -> None:
        self.gates, self.weight = gates, weight

    def __call__(self) -> Tensor:
        terms = [g.penalty() for g in self.gates]  # on the gates' device
        return self.weight * (sum(terms[1:], terms[0]) if terms else torch.zeros(()))


def _has_svd(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("LinearSVDO", "Conv2dSVDO") for m in model.modules())

"""A recipe stage's optimizers and its learning-rate schedule (used by `dynsparse.recipes.train.Trainer`).

The weights and the gate parameters get one optimizer each (the stage's ``optimizer`` and ``gate_optimizer``), a
budget regularizer's Lagrange multipliers a maximizing Adam; `lr_factor` scales the base learning rates per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .schema import OptimizerSpec, RegularizerSpec, ScheduleSpec, StageSpec

__all__ = ["lr_factor", "stage_optimizers"]


def _optimizer(spec: OptimizerSpec, params: list[nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_factor(spec: ScheduleSpec, step: int, total: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total`` (a pure function of the step)."""
    warm = int(spec.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if spec.name == "constant" or total <= warm:
        return 1.0
    t = (step - warm) / max(1, total - warm)
    low = spec.min_lr_ratio
    if spec.name == "linear":
        return low + (1 - low) * (1 - t)
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))


def _gate_param_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters the gate optimizer trains: those of dynsparse gates installed under a ``gate`` child.

    By identity, not by name alone: a host module may be called ``gate`` itself (timm's gMLP ``mlp_channels.gate``,
    ``Attention(gated=True)``), and its weights are weights. Routers and Deja Vu predictors (gates not under a
    ``gate`` child) stay with the weights, as the recipes were tuned.
    """
    from ..gate_ops import named_gates

    owned = {id(p) for _, g in named_gates(model) for p in g.parameters()}
    return {id(p) for n, p in model.named_parameters() if id(p) in owned and ".gate." in f".{n}"}


def _gate_optimizer(model: nn.Module, st: StageSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``st.gate_optimizer`` over ``params``; without one, the stage's optimizer with no weight decay on static gates.

    A static gate's parameters (hard-concrete ``log α``, sigmoid scores) are not weights: decay would pull them
    towards 0, a fixed keep probability (about 0.83 for hard-concrete), whatever the data say; CoFi and Louizos et
    al. use none. Input-dependent gates (FBS saliency, token predictors) are small networks and keep the decay.
    """
    if st.gate_optimizer is not None:
        return _optimizer(st.gate_optimizer, params)
    from ..gate_ops import named_gates
    from ..gates import InputDependentGate

    static = {id(p) for _, g in named_gates(model) if not isinstance(g, InputDependentGate) for p in g.parameters()}
    groups = [
        {"params": [p for p in params if id(p) in static], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) not in static]},
    ]
    return _optimizer(st.optimizer, [g for g in groups if g["params"]])


def stage_optimizers(
    model: nn.Module, st: StageSpec, regs: list[tuple[RegularizerSpec, Any]]
) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of a stage, by name.

    ``"weights"``: every trainable parameter but the gates' (`_gate_param_ids`), by ``st.optimizer``;
    ``"gates"`` (when there are trainable gate parameters): by ``st.gate_optimizer``, else ``st.optimizer``
    without weight decay on static gates (`_gate_optimizer`);
    ``"lambdas"`` (when ``regs`` holds a budget): the budget's Lagrange multipliers, by Adam at the budget's
    ``lr``, maximizing.

    Args:
        model: The model being trained.
        st: The stage.
        regs: The stage's regularizers (`dynsparse.recipes.regularize.build_regularizers`).
    """
    gates = _gate_param_ids(model)
    gate_params = [p for p in model.parameters() if id(p) in gates and p.requires_grad]
    weights = [p for p in model.parameters() if id(p) not in gates and p.requires_grad]
    opts = {"weights": _optimizer(st.optimizer, weights)}
    if gate_params:
        opts["gates"] = _gate_optimizer(model, st, gate_params)
    budget = next((o for r, o in regs if r.name == "budget"), None)
    if budget is not None:
        opts["lambdas"] = torch.optim.Adam(
            budget.parameters(), lr=next(r.lr for r, _ in regs if r.name == "budget"), maximize=True
        )
    return opts

"""What a recipe training step adds to the cross-entropy: the stage's regularizer terms and the distillation term.

Used by `dynsparse.recipes.train.Trainer`; the regularizer objects come from
`dynsparse.recipes.regularize.build_regularizers`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schema import RegularizerSpec

__all__ = ["distill_loss", "regularizer_loss"]


def regularizer_loss(
    model: nn.Module,
    regs: list[tuple[RegularizerSpec, Any]],
    epoch: float,
    step_in_stage: int,
    n_train: int,
    device: torch.device,
) -> tuple[Tensor, dict[str, float]]:
    """The sum of the regularizer terms at one step, and the numbers the log record shows.

    ``bn_l1`` (a subgradient after backward) and a proximal ``group_lasso`` (a step after the update) add no term
    here. The numbers: ``lambda1`` and ``target`` of a budget, ``kl_weight`` of sparse VD.

    Args:
        model: The model being trained (sparse VD's KL term reads it).
        regs: ``(spec, object)`` per regularizer of the stage.
        epoch: Epochs done in the stage, fractional (sparse VD's KL warm-up).
        step_in_stage: Optimizer steps done in the stage (a budget's target schedule).
        n_train: Size of the training set (sparse VD's KL is per example).
        device: Where the zero total lives when no term is added.

    Returns:
        ``(total, info)``: a scalar tensor and ``{name: value}``.
    """
    total = torch.zeros((), device=device)
    info: dict[str, float] = {}
    for r, obj in regs:
        if r.name == "budget":
            term = obj(step_in_stage)
            info["lambda1"] = float(obj.lambda1.detach())
            info["target"] = obj.target_at(step_in_stage)
        elif r.name == "sparse_vd":
            from ..regularizers.variational import kl_weight, svd_kl

            # 0 before kl_start, then linear to 1 at kl_end (a step at kl_start when kl_end <= kl_start)
            w = kl_weight(epoch, start=r.kl_start, end=r.kl_end)
            info["kl_weight"] = w
            term = r.weight * w * svd_kl(model) / n_train
        elif r.name == "bn_l1" or (r.name == "group_lasso" and r.prox):
            continue  # a subgradient after backward (as the reference code) / a proximal step after the update
        else:
            term = obj()
        total = total + term
    return total, info


def distill_loss(out: Tensor, t_out: Tensor, temperature: float) -> Tensor:
    """Knowledge distillation: ``KL(teacher ‖ student)`` of the softened outputs, times ``T²``.

    Args:
        out: Student logits (B, classes).
        t_out: Teacher logits (B, classes).
        temperature: ``T``.
    """
    T = temperature
    return (
        F.kl_div(
            F.log_softmax(out / T, -1),
            F.log_softmax(t_out / T, -1),
            log_target=True,
            reduction="batchmean",
        )
        * T
        * T
    )

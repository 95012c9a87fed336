"""The numbers a recipe run reports: test accuracy and sparsity per log record, a digest of the final state.

Used by `dynsparse.recipes.train.Trainer` (``state_digest`` also by the tests and the runner, to check that
ranks or runs ended identical).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from ..gate_ops import named_gates
from ..gates import Gate
from ..modules import module_device
from .regularize import weight_sparsity
from .schema import Recipe

__all__ = ["eval_accuracy", "mean_over_ranks", "sparsity_record", "state_digest"]


def state_digest(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (to check that ranks or runs ended identical)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def mean_over_ranks(total: float, count: int, world: int, device: torch.device) -> float | None:
    """``total / count`` summed over the ranks of a distributed run (one all-reduce; every rank must call it).

    ``world == 1`` reduces nothing (plain float arithmetic, so a one-process run logs the same number as before).

    Args:
        total: This rank's sum (e.g. of the per-sample training loss of an epoch).
        count: This rank's number of samples.
        world: Ranks in the run (`torch.distributed`'s process group when > 1).
        device: Where the reduced tensor lives (the run's device: CUDA for nccl).

    Returns:
        The mean over all ranks' samples, or ``None`` when no rank saw a sample.
    """
    if world > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        total, count = float(t[0]), round(float(t[1]))
    return total / count if count else None


def eval_accuracy(model: nn.Module, loader, num_classes: int) -> float:
    """Test accuracy of ``model`` over ``loader``, on the model's device (eval mode; its training flag is kept)."""
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=False)  # every rank sees all
    was = model.training
    model.eval()
    device = module_device(model)
    with torch.no_grad():
        for x, y in loader:
            metric.update(model(x.to(device, non_blocking=True)).argmax(-1).cpu(), y)
    model.train(was)
    return float(metric.compute())


def sparsity_record(
    model: nn.Module, budget: Any, recipe: Recipe, example: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """The sparsity numbers of a log record.

    ``kept_flops`` and ``expected_kept_flops`` when the model has static gates (by the budget's cost model, else
    one built on ``example`` moved to ``device``); ``weight_sparsity`` when a stage of ``recipe`` prunes weights
    (magnitude / unstructured) or uses sparse VD.
    """
    out: dict[str, float] = {}
    gates = [g for _, g in named_gates(model) if isinstance(g, Gate)]  # static gates (not per-input ones)
    if gates:
        from ..flops import CostModel

        cost = budget.cost if budget is not None else CostModel(model, example.to(device))
        out["kept_flops"] = cost.fraction()
        with torch.no_grad():
            out["expected_kept_flops"] = float(cost.expected_fraction())
    unstructured = any(
        st.prune is not None and st.prune.method in ("magnitude", "unstructured") for st in recipe.stages
    )
    if unstructured or any(r.name == "sparse_vd" for st in recipe.stages for r in st.regularizers):
        out["weight_sparsity"] = weight_sparsity(model)
    return out

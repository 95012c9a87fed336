"""Weight pruning: unstructured masks (``unstructured_``, ``remove_``), schedules, lottery tickets, block / N:M.

Masked layers are drop-in twins of ``nn.Linear`` / ``nn.Conv2d`` (same ``weight`` / ``bias``, plus a
``weight_mask`` buffer); `BlockSparseLinear` runs a BSR kernel where it measured faster than dense.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from dynsparse import prune
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> _ = prune.unstructured_(model, 0.5)
    >>> prune.sparsity(model).overall
    0.5
    >>> _ = prune.remove_(model)
    >>> type(model[0]).__name__
    'Linear'
"""

from .blocks import BLOCK_SCORES, EVICT_BYTES, BlockSparseLinear, block_mask, block_scores, nm_mask
from .lottery import ImpResult, LotteryRound, LotteryTicket, imp, reinit_
from .schedule import IterativePruner, agp, exponential, linear, one_shot
from .sensitivity import SensitivityResult, sensitivity
from .structured import structured_
from .unstructured import (
    IMPORTANCES,
    SCOPES,
    MaskedConv2d,
    MaskedLinear,
    Sparsity,
    apply_masks_,
    masks,
    reapply_masks_,
    reapply_masks_on_step,
    remove_,
    sparsity,
    unstructured_,
)

__all__ = [
    "BLOCK_SCORES",
    "EVICT_BYTES",
    "IMPORTANCES",
    "SCOPES",
    "BlockSparseLinear",
    "ImpResult",
    "IterativePruner",
    "LotteryRound",
    "LotteryTicket",
    "MaskedConv2d",
    "MaskedLinear",
    "SensitivityResult",
    "Sparsity",
    "agp",
    "apply_masks_",
    "block_mask",
    "block_scores",
    "exponential",
    "imp",
    "linear",
    "masks",
    "nm_mask",
    "one_shot",
    "reapply_masks_",
    "reapply_masks_on_step",
    "reinit_",
    "remove_",
    "sensitivity",
    "sparsity",
    "structured_",
    "unstructured_",
]

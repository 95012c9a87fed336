"""Top-k gate: keeps exactly k units (or a keep ratio) by a learned score."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import GateError
from . import functional as F
from .base import Gate

__all__ = ["TopKGate"]


class TopKGate(Gate):
    """Keeps the ``k`` units with the highest learned scores.

    Training returns the hard top-k mask forward and the gradient of ``sigmoid(score)`` backward
    (straight-through), so scores learn which units to keep. Ties go to the lower index.

    Args:
        num_units: Number of units.
        k: Exact number of units kept (``0 <= k <= num_units``). Mutually exclusive with ``keep``.
        keep: Fraction kept, rounded to the nearest count (at least 1 when ``keep > 0``). Default 1.0 (open).
        device: Device of the parameter.
        dtype: Dtype of the parameter.

    Examples:
        >>> g = TopKGate(4, k=2)
        >>> with torch.no_grad():
        ...     _ = g.scores.copy_(torch.tensor([0.1, 0.9, 0.5, 0.2]))
        >>> g.keep_mask()
        tensor([False,  True,  True, False])
    """

    def __init__(
        self,
        num_units: int,
        k: int | None = None,
        keep: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units)
        self.k = self._resolve_k(num_units, k, keep)
        self.scores = nn.Parameter(torch.zeros(num_units, device=device, dtype=dtype))

    @staticmethod
    def _resolve_k(n: int, k: int | None, keep: float | None) -> int:
        if k is not None and keep is not None:
            raise GateError("TopKGate: give either k or keep, not both")
        if k is not None:
            # any integer, numpy's included (a k computed with numpy is an np.int64)
            if not isinstance(k, numbers.Integral) or isinstance(k, (bool, np.bool_)) or not 0 <= k <= n:
                raise GateError(f"TopKGate: k must be an int in [0, {n}], got {k!r}")
            return int(k)
        keep = 1.0 if keep is None else keep
        if isinstance(keep, (bool, np.bool_)) or not isinstance(keep, numbers.Real) or not 0.0 <= keep <= 1.0:
            raise GateError(f"TopKGate: keep must be in [0, 1], got {keep!r}")
        keep = float(keep)
        return 0 if keep == 0 else min(n, max(1, math.floor(keep * n + 0.5)))

    def set_k_(self, k: int | None = None, keep: float | None = None) -> TopKGate:
        """Change how many units are kept; returns self."""
        self.k = self._resolve_k(self.num_units, k, keep)
        return self

    def forward(self) -> Tensor:
        hard = F.topk_mask(self.scores, self.k).to(self.scores.dtype)
        return F.straight_through(hard, torch.sigmoid(self.scores)) if self.training else hard

    def eval_values(self) -> Tensor:
        return F.topk_mask(self.scores, self.k).to(self.scores.dtype)

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, k={self.k}"

"""Sigmoid gate hardened with the straight-through estimator."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GateError
from . import functional as F
from .base import Gate

__all__ = ["SigmoidGate"]


class SigmoidGate(Gate):
    """A learned logit per unit; the unit is kept when ``sigmoid(logit / temperature) > threshold``.

    Training returns the hard 0/1 decision in the forward pass and the gradient of the soft
    ``sigmoid(logit / temperature)`` in the backward pass (straight-through). Eval returns the hard decision.
    The penalty is the sum of the soft keep probabilities (an L1 on the soft gates).

    Args:
        num_units: Number of units.
        init_logit: Initial logit (default 3.0: every unit open).
        temperature: Temperature of the sigmoid (> 0).
        threshold: Keep threshold on the soft value, in (0, 1).
        device: Device of the parameter.
        dtype: Dtype of the parameter.

    Examples:
        >>> SigmoidGate(3).eval()()
        tensor([1., 1., 1.])
    """

    def __init__(
        self,
        num_units: int,
        init_logit: float = 3.0,
        temperature: float = 1.0,
        threshold: float = 0.5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units)
        if not (math.isfinite(temperature) and temperature > 0):
            raise GateError(f"SigmoidGate: temperature must be > 0, got {temperature}")
        if not (0.0 < threshold < 1.0):
            raise GateError(f"SigmoidGate: threshold must be in (0, 1), got {threshold}")
        if not math.isfinite(init_logit):
            raise GateError(f"SigmoidGate: init_logit must be a finite number, got {init_logit}")
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.logits = nn.Parameter(torch.full((num_units,), float(init_logit), device=device, dtype=dtype))

    def soft(self) -> Tensor:
        """(num_units,) soft keep probability ``sigmoid(logit / temperature)``."""
        return torch.sigmoid(self.logits / self.temperature)

    def forward(self) -> Tensor:
        soft = self.soft()
        hard = (soft > self.threshold).to(soft.dtype)
        return F.straight_through(hard, soft) if self.training else hard

    def eval_values(self) -> Tensor:
        return (self.soft() > self.threshold).to(self.logits.dtype)

    def expected_keep(self) -> Tensor:
        return self.soft()

    def penalty(self) -> Tensor:
        return self.soft().sum()

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, temperature={self.temperature}, threshold={self.threshold}"

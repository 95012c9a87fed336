"""Helpers shared by the gate tests (``test_gates_*.py``): a close-check with the max-abs difference in its
message, readable ids for keyword-argument tables, and a small input-dependent gate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynsparse.gates import InputDependentGate
from dynsparse.gates import functional as F


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-12, rtol: float = 1e-10, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    if not isinstance(expected, Tensor):
        expected = torch.tensor(expected, dtype=actual.dtype)
    diff = (actual.detach() - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual.detach(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}"
    )


def _kw_id(kwargs: dict) -> str:
    """Readable test ids for keyword-argument tables (tensors as dtype and shape)."""

    def show(v: object) -> str:
        return f"{v.dtype}{tuple(v.shape)}".replace("torch.", "") if isinstance(v, Tensor) else repr(v)

    return ",".join(f"{k}={show(v)}" for k, v in kwargs.items())


class LinearTopKGate(InputDependentGate):
    """Keeps, per sample, the ``num_kept()`` units with the highest linear score (straight-through)."""

    def __init__(self, in_features: int, num_units: int, keep: float = 1.0) -> None:
        super().__init__(num_units, keep)
        self.score = nn.Linear(in_features, num_units)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.score(x)  # (B, num_units)
        idx = scores.topk(self.num_kept(), dim=-1).indices
        hard = torch.zeros_like(scores).scatter(-1, idx, 1.0)
        return F.straight_through(hard, torch.sigmoid(scores))

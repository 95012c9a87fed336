"""Helpers shared by the importance tests (``test_importance_*.py``): a close-check in float64 with the max
difference in its message, float64 tensors, a half squared-error loss, and a check that no hook is left behind.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def assert_close(actual: Tensor, expected, atol: float = 1e-10, rtol: float = 1e-7, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = actual.detach().double().cpu()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max diff {diff:.3g}\n{m}"
    )


def f64(values) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def half_sq(out: Tensor, target: Tensor) -> Tensor:
    """``mean_i ½‖y_i − t_i‖²``: its gradient in ``y_i`` is ``(y_i − t_i) / B``."""
    return 0.5 * (out - target).pow(2).sum(-1).mean()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

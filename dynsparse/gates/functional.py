"""Pure gate math, the functional twins of the gate modules (no state, no modules).

Hard-concrete equations follow Louizos, Welling & Kingma (ICLR 2018), section 4 and eq. 13, with the
reference code's defaults: beta = 2/3, gamma = -0.1, zeta = 1.1, u ~ U(eps, 1 - eps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "BETA",
    "EPS",
    "GAMMA",
    "ZETA",
    "hard_concrete_eval",
    "hard_concrete_prob_nonzero",
    "hard_concrete_sample",
    "inward_clamp",
    "straight_through",
    "topk_mask",
]

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6


def hard_concrete_sample(
    log_alpha: Tensor,
    beta: float = BETA,
    gamma: float = GAMMA,
    zeta: float = ZETA,
    eps: float = EPS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one hard-concrete sample per unit.

    ``u ~ U(eps, 1-eps)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
    ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)``.

    Args:
        log_alpha: (N,) location parameters.

    Returns:
        (N,) samples in [0, 1] of ``log_alpha``'s dtype, differentiable w.r.t. ``log_alpha``. The noise and the
        sigmoid are computed in float32 at least: a bfloat16 ``u`` (256 values per octave) cuts the logistic tails,
        so the draws no longer followed the distribution of `hard_concrete_prob_nonzero`.
    """
    wide = torch.promote_types(log_alpha.dtype, torch.float32)
    u = torch.empty(log_alpha.shape, dtype=wide, device=log_alpha.device).uniform_(eps, 1.0 - eps, generator=generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.to(wide)) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0).to(log_alpha.dtype)


def hard_concrete_eval(log_alpha: Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> Tensor:
    """Deterministic test-time gate ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (eq. 13, no 1/beta)."""
    return torch.clamp(torch.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_prob_nonzero(
    log_alpha: Tensor, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
) -> Tensor:
    """Probability that a gate is non-zero, ``1 - Q(s_bar <= 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``.

    Its sum over units is the closed-form expected L0 norm (eq. 12).
    """
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


class _InwardClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        # a descent step moves x by -grad: outside the range, keep only the gradients that move it back inside
        outward = ((x < lo) & (grad > 0)) | ((x > hi) & (grad < 0))
        return grad.masked_fill(outward, 0), None, None


def inward_clamp(x: Tensor, lo: float, hi: float) -> Tensor:
    """``x.clamp(lo, hi)`` whose gradient never pushes ``x`` further outside ``[lo, hi]``.

    Inside the range (bounds included) the gradient is the identity's; outside, it passes only where a descent step
    (``x -= lr · grad``) moves ``x`` back towards the range, and is 0 where it would move ``x`` further out. Unlike
    ``clamp`` (0 outside whatever the direction), a value that drifted past a bound is never frozen there.

    Examples:
        >>> x = torch.tensor([-12.0, 0.0, 12.0], requires_grad=True)
        >>> (inward_clamp(x, -8.0, 8.0) * torch.tensor([-1.0, 1.0, -1.0])).sum().backward()
        >>> x.grad  # -1 at -12 moves it up (back in); -1 at 12 would move it further up
        tensor([-1.,  1.,  0.])
    """
    return _InwardClamp.apply(x, lo, hi)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value ``hard``, gradient of ``soft`` (the straight-through estimator)."""
    return hard + (soft - soft.detach())


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` highest scores; ties go to the lower index (deterministic).

    Args:
        scores: (N,) scores.
        k: number of units kept, ``0 <= k <= N``.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask

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
        (N,) samples in [0, 1], differentiable w.r.t. ``log_alpha``.
    """
    u = torch.empty_like(log_alpha).uniform_(eps, 1.0 - eps, generator=generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


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

"""Hard-concrete (L0) gate of Louizos, Welling & Kingma (ICLR 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import GateError
from . import functional as F
from .base import Gate

__all__ = ["HardConcreteGate"]


class HardConcreteGate(Gate):
    """L0 gate with a stretched, rectified binary-concrete distribution per unit.

    Training draws ``z = clamp(sigmoid((log u - log(1-u) + log_alpha)/beta) * (zeta-gamma) + gamma, 0, 1)``
    with ``u ~ U(eps, 1-eps)`` (one draw per unit per forward, shared by the batch). Eval uses the
    deterministic ``clamp(sigmoid(log_alpha) * (zeta-gamma) + gamma, 0, 1)``. The penalty is the closed-form
    expected L0 norm ``sum_j sigmoid(log_alpha_j - beta * log(-gamma/zeta))``.

    Args:
        num_units: Number of units.
        init_drop_rate: Initial drop probability ``p0``; ``log_alpha = log(1-p0) - log(p0)``. The default 0.05
            makes the eval gate exactly 1 (open), so a freshly gated model computes the host's output.
        init_std: Standard deviation of the initial ``log_alpha`` (reference code: 0.01). 0 gives a constant.
        beta: Temperature (2/3).
        gamma: Lower stretch limit (-0.1).
        zeta: Upper stretch limit (1.1).
        eps: Clamp of the uniform noise (1e-6).
        log_alpha_range: Range ``constrain_()`` clamps ``log_alpha`` to (reference: log 1e-2 .. log 1e2).
        device: Device of the parameter.
        dtype: Dtype of the parameter.

    Examples:
        >>> g = HardConcreteGate(4).eval()
        >>> g()
        tensor([1., 1., 1., 1.], grad_fn=<ClampBackward1>)
    """

    def __init__(
        self,
        num_units: int,
        init_drop_rate: float = 0.05,
        init_std: float = 0.0,
        beta: float = F.BETA,
        gamma: float = F.GAMMA,
        zeta: float = F.ZETA,
        eps: float = F.EPS,
        log_alpha_range: tuple[float, float] = (math.log(1e-2), math.log(1e2)),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units)
        if not 0.0 < init_drop_rate < 1.0:
            raise GateError(f"HardConcreteGate: init_drop_rate must be in (0, 1), got {init_drop_rate}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise GateError(f"HardConcreteGate: need gamma < 0 < 1 < zeta and beta > 0, got {gamma}, {zeta}, {beta}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise GateError(f"HardConcreteGate: init_std must be >= 0, got {init_std}")
        if not 0.0 <= eps < 0.5:
            raise GateError(f"HardConcreteGate: eps (the clamp of the uniform noise) must be in [0, 0.5), got {eps}")
        lo, hi = (float(v) for v in log_alpha_range)
        if not lo < hi:
            raise GateError(
                f"HardConcreteGate: log_alpha_range must be (low, high) with low < high, got {log_alpha_range}"
            )
        self.init_drop_rate = float(init_drop_rate)
        self.init_std = float(init_std)
        self.beta, self.gamma, self.zeta, self.eps = float(beta), float(gamma), float(zeta), float(eps)
        self.log_alpha_range = (lo, hi)
        self.log_alpha = nn.Parameter(torch.empty(num_units, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise ``log_alpha`` to ``N(log(1-p0) - log(p0), init_std)``."""
        mean = math.log(1.0 - self.init_drop_rate) - math.log(self.init_drop_rate)
        with torch.no_grad():
            self.log_alpha.normal_(mean, self.init_std) if self.init_std > 0 else self.log_alpha.fill_(mean)

    def forward(self) -> Tensor:
        if self.training:
            return F.hard_concrete_sample(self.log_alpha, self.beta, self.gamma, self.zeta, self.eps)
        return self.eval_values()

    def eval_values(self) -> Tensor:
        return F.hard_concrete_eval(self.log_alpha, self.gamma, self.zeta)

    def expected_keep(self) -> Tensor:
        return F.hard_concrete_prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    def penalty(self) -> Tensor:
        """Expected L0 norm (expected number of non-zero gates), differentiable w.r.t. ``log_alpha``."""
        return self.expected_keep().sum()

    @torch.no_grad()
    def constrain_(self) -> HardConcreteGate:
        """Clamp ``log_alpha`` to ``log_alpha_range`` (call after an optimizer step, as the reference code does)."""
        self.log_alpha.clamp_(*self.log_alpha_range)
        return self

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}"

"""Block routers: per input, whether a residual block runs at all (per-input layer skipping).

A `BlockRouter` reads the block's input tokens (their mean by default: the class token is the same for every
input until the first attention has run) and gives
each input a probability of running the block, ``p = σ(wᵀ LN(x) + b)``. At inference the block runs for the
inputs with ``p ≥ 1 − keep`` (``keep`` is the run-time knob: 1 runs every block, smaller values skip more);
in training hard decisions are sampled with a straight-through Gumbel-sigmoid and the block's update is
multiplied by them, and `penalty` pulls the mean probability towards ``target`` (the fraction of inputs
that should run the block). The bias starts at +3 (p ≈ 0.95: every block runs at first).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .base import InputDependentGate

__all__ = ["ROUTERS", "BlockRouter"]

#: Registered block routers: name -> class.
ROUTERS: Registry[type[InputDependentGate]] = Registry("block router")


@ROUTERS.register("router")
class BlockRouter(InputDependentGate):
    """A per-input router of one residual block (one unit: the block).

    Args:
        dim: Token width C.
        keep: Run-time knob: inputs with ``p ≥ 1 − keep`` run the block (default 0.5: ``p ≥ 0.5``).
        target: Training target of the mean run probability (for `penalty`).
        weight: Weight of the penalty ``weight · (mean p − target)²``.
        tau: Temperature of the Gumbel-sigmoid in training.
        pool: ``"mean"`` (mean over tokens) or ``"token"`` (the first token; input-independent in block 0).
    """

    def __init__(
        self,
        dim: int,
        keep: float = 0.5,
        target: float = 0.5,
        weight: float = 2.0,
        tau: float = 1.0,
        pool: str = "mean",
    ) -> None:
        super().__init__(1, keep)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ConfigError(f"router: dim must be the token width, got {dim!r}")
        _check_positive("router", "tau", tau)
        _check_positive("router", "weight", weight, allow_zero=True)
        if not _is_real(target) or not 0.0 <= target <= 1.0:
            raise ConfigError(f"router: target must be a fraction in [0, 1], got {target!r}")
        if pool not in ("token", "mean"):
            raise ConfigError(f"router: pool must be 'token' or 'mean', got {pool!r}")
        self.dim, self.target, self.weight, self.tau, self.pool = dim, float(target), float(weight), float(tau), pool
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 3.0)
        self._p: Tensor | None = None

    def pooled(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        """(B, C) summary of tokens ``x`` (B, N, C): the first token, or the mean of the tokens.

        ``policy`` (B, N): keep weights of the tokens (a token gate's masked path); the mean is then over the kept
        tokens only, as it is when the kept tokens are gathered.
        """
        if self.pool == "token":
            return x[:, 0]
        if policy is None:
            return x.mean(1)
        w = policy.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1e-6)

    def logits(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        """(B,) router logits of tokens ``x`` (B, N, C) (``policy``: see `pooled`)."""
        return self.logits_pooled(self.pooled(x, policy))

    def logits_pooled(self, z: Tensor) -> Tensor:
        """(B,) router logits of pooled tokens ``z`` (B, C) (see `pooled`)."""
        return self.proj(self.norm(z)).squeeze(-1)

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        """(B, 1) multiplier: hard 0/1 decisions (straight-through samples in training); ``policy``: see `pooled`."""
        return self.decide(self.logits(x, policy))

    def decide(self, logit: Tensor) -> Tensor:
        """(B, 1) decisions from (B,) logits: ``p ≥ 1 − keep`` at inference, straight-through samples in training."""
        p = logit.sigmoid()
        if self.training:
            self._p = p
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.tau)
            hard = (soft > 0.5).to(soft.dtype)
            return (hard - soft.detach() + soft).unsqueeze(-1)
        return (p >= 1.0 - self.keep).to(logit.dtype).unsqueeze(-1)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_p"] = None  # carries an autograd graph
        return state

    def penalty(self) -> Tensor:
        if self._p is None or not self.training:
            return self.proj.bias.new_zeros(())
        return self.weight * (self._p.mean() - self.target) ** 2

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keep={self.keep}, target={self.target}, pool={self.pool!r}"


def _check_positive(owner: str, name: str, v: float, allow_zero: bool = False) -> None:
    """Raise a `ConfigError` naming ``name`` unless ``v`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if not (_is_real(v) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
        raise ConfigError(f"{owner}: {name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")


def _is_real(v: object) -> bool:
    """True for a real number (numpy scalars too), never a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

"""Target-sparsity controller: a Lagrangian whose multipliers are maximised (CoFi, Xia et al. 2022).

With ``s`` the expected kept fraction of FLOPs (or parameters) computed from the gates and ``t`` the target
on its schedule, the term added to the loss is ``λ1·(s − t) + λ2·(s − t)²``. The model minimises it; the
multipliers ``λ1, λ2`` are trained by gradient *ascent* (an optimizer with ``maximize=True``), so any gap
between ``s`` and ``t`` makes them grow until the gates meet the target. ``enforce_`` closes the least
likely units at the end so the deterministic kept fraction is at most the target.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flops import CostModel
from ..gates import SigmoidGate
from .variational import VariationalGate

__all__ = ["TargetSparsity", "linear_target"]


def linear_target(step: int, target: float, warmup_steps: int, start: float = 1.0) -> float:
    """Kept-fraction target at ``step``: from ``start`` linearly to ``target`` over ``warmup_steps``, then flat."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return target
    return start + (target - start) * step / warmup_steps


class TargetSparsity(nn.Module):
    """``λ1·(s − t) + λ2·(s − t)²`` with learnable multipliers to maximise.

    Args:
        model: The gated model.
        target: Kept fraction to reach (``0.4`` = keep 40 % of the FLOPs), in (0, 1].
        kind: ``"flops"`` or ``"params"``.
        warmup_steps: Steps over which the target moves linearly from 1 to ``target``.
        example_input: Input of one forward pass for the FLOPs count (default: the timm input size).

    Example:
        >>> import timm, dynsparse as ds
        >>> model = ds.sparsify_(timm.create_model("test_vit"), {"heads": "hard_concrete", "neurons": "hard_concrete"})
        >>> budget = TargetSparsity(model, target=0.4, warmup_steps=1000)
        >>> opt_lambda = torch.optim.Adam(budget.parameters(), lr=0.01, maximize=True)
        >>> term = budget(step=0)  # add to the task loss, backward, then step both optimizers
        >>> term.shape, round(budget.target_at(0), 2), round(budget.target_at(1000), 2)
        (torch.Size([]), 1.0, 0.4)
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        kind: Literal["flops", "params"] = "flops",
        warmup_steps: int = 0,
        example_input: Tensor | tuple | None = None,
    ) -> None:
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ConfigError(f"TargetSparsity: target (kept fraction) must be in (0, 1], got {target!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"TargetSparsity: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.cost = CostModel(model, example_input, kind=kind)
        if not self.cost.slots:
            raise ConfigError("TargetSparsity: the model has no gates (call dynsparse.sparsify_ first)")
        self.target, self.kind, self.warmup_steps = float(target), kind, int(warmup_steps)
        ref = self.cost.slots[0][1].gate.expected_keep()
        # float32 at least, like the expected fraction: in bfloat16 an Adam step of 0.01 is lost once |λ| >= 4
        dtype = torch.promote_types(ref.dtype, torch.float32)
        self.lambda1 = nn.Parameter(torch.zeros((), dtype=dtype, device=ref.device))
        self.lambda2 = nn.Parameter(torch.zeros((), dtype=dtype, device=ref.device))

    def target_at(self, step: int) -> float:
        return linear_target(step, self.target, self.warmup_steps)

    def expected(self) -> Tensor:
        """Differentiable expected kept fraction ``s``."""
        return self.cost.expected_fraction()

    def forward(self, step: int) -> Tensor:
        gap = self.expected() - self.target_at(step)
        return self.lambda1 * gap + self.lambda2 * gap * gap

    @torch.no_grad()
    def enforce_(self, max_iter: int = 100_000, reopen: bool = False) -> float:
        """Close the units least likely to be kept until the deterministic kept fraction is ≤ ``target``.

        Works on gates with a ``log_alpha`` (hard-concrete, variational) or ``logits`` (sigmoid) parameter by setting
        the closed unit's entry to a value that closes it (see `_closer`); returns the kept fraction reached.

        Args:
            max_iter: Most units closed.
            reopen: Units are closed by probability, whatever they cost, so the last one closed (e.g. a whole
                residual branch) can take the kept fraction well under the target. ``True`` then reopens the units
                closed here, most likely first, each one only if the target still holds.
        """
        frac = self.cost.fraction()
        candidates = []
        for _, slot in self.cost.slots:
            g = slot.gate
            closer = _closer(g)
            if closer is None:
                continue
            keep = g.expected_keep()
            for j in range(g.num_units):
                candidates.append((float(keep[j]), *closer, j, g))
        candidates.sort(key=lambda c: c[0])
        closed, shut = 0, []
        for _, p, shut_value, j, g in candidates:
            if frac <= self.target + 1e-9 or closed >= max_iter:
                break
            if not bool(g.keep_mask()[j]):
                continue
            if int(g.keep_mask().sum()) <= 1 and g.num_units > 1:
                continue  # keep at least one unit per gate; a whole branch is closed by its layer gate
            old = float(p[j])
            p[j] = shut_value
            if bool(g.keep_mask()[j]):  # a gate this value does not close (another parameterisation): leave it
                p[j] = old
                continue
            shut.append((p, shut_value, j, old))
            closed += 1
            frac = self.cost.fraction()
        if reopen:  # ``shut`` is in order of increasing keep probability: the most likely come back first
            for p, shut_value, j, old in reversed(shut):
                p[j] = old
                now = self.cost.fraction()
                if now > self.target + 1e-9:
                    p[j] = shut_value
                else:
                    frac = now
        return frac

    def extra_repr(self) -> str:
        return f"target={self.target}, kind={self.kind!r}, warmup_steps={self.warmup_steps}"


def _closer(gate: nn.Module) -> tuple[Tensor, float] | None:
    """The parameter whose entry ``j`` decides whether unit ``j`` of ``gate`` is kept, and a value that closes it.

    Hard-concrete (``log_alpha``) and sigmoid (``logits``) gates close for a low enough value; a variational gate
    drops a unit for ``log α`` above its threshold. ``None`` for a gate with neither parameter.
    """
    if isinstance(gate, VariationalGate):  # dropped where log α > threshold; in the clip range when it allows
        return gate.log_alpha, max(gate.threshold + 1.0, gate.log_alpha_range[1])
    if isinstance(gate, SigmoidGate):  # closed where sigmoid(logit / T) <= threshold
        return gate.logits, gate.temperature * (math.log(gate.threshold / (1.0 - gate.threshold)) - 20.0)
    p = getattr(gate, "log_alpha", None)
    if p is None:
        p = getattr(gate, "logits", None)
    return None if p is None else (p, -20.0)

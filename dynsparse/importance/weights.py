"""Per-weight scores that need no loss: magnitude, random, Wanda, movement.

Every function returns ``{param_fqn: scores}`` with one score per weight (the weight's shape, detached, on the
CPU) for the ``weight`` of every ``nn.Linear`` / ``nn.Conv2d`` (subclasses included; not the layers of gates,
which are never pruned) whose module fqn matches ``include`` and not ``exclude``. Higher = more important = kept,
in the whole package; the dicts feed `unstructured_masks` or
``dynsparse.prune.unstructured_(model, s, importance=scores)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._util import batches, scoring_mode, split_batch, to_model, used_weight, weight_modules

__all__ = ["MovementTracker", "magnitude", "movement", "random", "wanda"]

Globs = str | Sequence[str] | None


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: ``dtype``, or float32 for a narrower float."""
    return torch.promote_types(dtype, torch.float32)


def magnitude(model: nn.Module, p: float = 1, *, include: Globs = None, exclude: Globs = None) -> dict[str, Tensor]:
    """Magnitude scores ``|w|^p``: ``|w|`` for ``p=1``, ``w²`` for ``p=2`` (Han et al. 2015; methods.md 2.1).

    ``w`` is the weight the forward uses (``masked_weight()`` of a masked layer: a pruned weight scores 0).

    Args:
        model: Any module.
        p: Positive exponent; it does not change the ranking, only the values.
        include: Module fqn glob patterns to score (default: every Linear / Conv2d).
        exclude: Module fqn glob patterns left out (e.g. ``"head"``).

    Examples:
        >>> m = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = m.weight.copy_(torch.tensor([[-3.0, 2.0]]))
        >>> magnitude(nn.Sequential(m), p=2)["0.weight"]
        tensor([[9., 4.]])
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < float("inf"):
        raise ConfigError(f"magnitude: p must be a positive number, got {p!r}")
    out = {}
    for key, m in weight_modules(model, include, exclude).items():
        w = used_weight(m).abs()
        out[key] = (w if p == 1 else w.pow(p)).cpu()
    return out


def random(
    model: nn.Module, generator: torch.Generator | None = None, *, include: Globs = None, exclude: Globs = None
) -> dict[str, Tensor]:
    """I.i.d. uniform [0, 1) scores per weight (methods.md 2.2): the random control at the same densities.

    Args:
        model: Any module.
        generator: A CPU ``torch.Generator`` for reproducible scores (default: the global RNG).
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.
    """
    return {
        key: torch.rand(m.weight.shape, generator=generator)
        for key, m in weight_modules(model, include, exclude).items()
    }


@torch.no_grad()
def wanda(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    include: Globs = None,
    exclude: Globs = None,
) -> dict[str, Tensor]:
    """Wanda scores ``S_ij = |W_ij| · ‖X_j‖₂`` (Sun et al. 2023; methods.md 2.23), ``W`` the weight the forward
    uses (``masked_weight()`` of a masked layer), computed in the weight's dtype but float32 at least (as the
    reference code does for float16 models).

    ``‖X_j‖₂`` is the L2 norm of input feature ``j`` of the layer over every token / position of every
    calibration batch, gathered by forward pre-hooks that are removed afterwards. For a ``Conv2d`` ``j`` is the
    input channel (norm over batch and spatial positions) and the score broadcasts over the kernel window (an
    approximation: the paper scores Linear layers). One pass over the dense model in eval mode (the paper's
    sequential layer-by-layer pruning is not done); the model's training flags and buffers are restored.
    Wanda compares weights **within each output row**: use ``unstructured_masks(scores, s, scope="row")``.

    Args:
        model: Any module.
        data: Iterable of calibration batches (a tensor or an ``(inputs, targets)`` tuple each).
        max_batches: Use at most this many batches.
        include: Module fqn glob patterns to score.
        exclude: Module fqn glob patterns left out.

    Shapes:
        Linear input: ``(..., C_in)``; Conv2d input: ``(B, C_in, H, W)`` or ``(C_in, H, W)``.
    """
    modules = weight_modules(model, include, exclude)
    sq: dict[str, Tensor] = {}
    handles = []

    def make_hook(key: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                x = x if x.dim() == 4 else x.unsqueeze(0)
                s = x.double().pow(2).sum((0, 2, 3))
            else:
                s = x.double().pow(2).reshape(-1, x.shape[-1]).sum(0)
            sq[key] = s if key not in sq else sq[key] + s

        return hook

    try:
        for key, m in modules.items():
            handles.append(m.register_forward_pre_hook(make_hook(key)))
        with scoring_mode(model, train=False):
            for batch in batches(data, max_batches, "wanda"):
                model(to_model(model, split_batch(batch)[0]))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, m in modules.items():
        w = used_weight(m).abs()
        if key not in sq:
            raise ConfigError(f"wanda: {key!r} ({type(m).__name__}) saw no input; exclude it or check the model")
        w = w.to(_at_least_float32(w.dtype))  # in float16 the product rounds and overflows
        norm = sq[key].sqrt().to(device=w.device, dtype=w.dtype)
        if isinstance(m, nn.Conv2d):
            groups = m.groups
            per_out = norm.view(groups, -1).repeat_interleave(w.shape[0] // groups, dim=0)  # (C_out, C_in / groups)
            out[key] = (w * per_out[:, :, None, None]).cpu()
        else:
            out[key] = (w * norm[None, :]).cpu()
    return out


def movement(model: nn.Module, *, include: Globs = None, exclude: Globs = None) -> dict[str, Tensor]:
    """One-step movement scores ``-w ⊙ ∂L/∂w`` from the current ``.grad`` (Sanh et al. 2020; methods.md 2.22).

    Weights moving away from zero (gradient descent grows ``|w|``) score high. Computed in the weight's dtype,
    float32 at least (as `MovementTracker` accumulates). For the accumulated score over training use
    `MovementTracker`.

    Raises:
        ConfigError: a selected weight has no ``.grad`` (call ``loss.backward()`` first).
    """
    out = {}
    for key, m in weight_modules(model, include, exclude).items():
        if m.weight.grad is None:
            raise ConfigError(f"movement: {key!r} has no .grad; call loss.backward() first")
        dtype = _at_least_float32(m.weight.dtype)  # a float16 product underflows
        out[key] = (-m.weight.detach().to(dtype) * m.weight.grad.detach().to(dtype)).cpu()
    return out


class MovementTracker:
    """Accumulates hard-movement scores ``S = -Σ_t w^(t) ⊙ (∂L/∂w)^(t)`` over training steps.

    This is the score the straight-through estimator of hard (top-k) movement pruning accumulates (methods.md
    2.22, with ``α_S = 1``). Call `step` after ``loss.backward()`` and before ``optimizer.step()``, so ``w`` and
    its gradient belong to the same step. Weights without a gradient at a step add nothing.

    Args:
        model: Any module; the selected weights are found once, here.
        include: Module fqn glob patterns to track.
        exclude: Module fqn glob patterns left out.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> tracker = MovementTracker(model)
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> tracker.step()
        >>> tracker.scores()["0.weight"].shape
        torch.Size([3, 4])
    """

    def __init__(self, model: nn.Module, *, include: Globs = None, exclude: Globs = None) -> None:
        self._weights = {key: m.weight for key, m in weight_modules(model, include, exclude).items()}
        self._acc = {  # float32 at least: a float16 sum of small products underflows
            key: torch.zeros_like(w, dtype=_at_least_float32(w.dtype), memory_format=torch.contiguous_format)
            for key, w in self._weights.items()
        }
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """Add ``-w ⊙ w.grad`` of every tracked weight to its score."""
        for key, w in self._weights.items():
            if w.grad is not None:
                acc = self._acc[key]
                acc.addcmul_(w.detach().to(acc.dtype), w.grad.detach().to(acc.dtype), value=-1.0)
        self.steps += 1

    def scores(self) -> dict[str, Tensor]:
        """``{param_fqn: accumulated score}`` (CPU copies)."""
        return {key: a.detach().cpu().clone() for key, a in self._acc.items()}

    def reset(self) -> None:
        """Set every score and the step count back to 0."""
        for a in self._acc.values():
            a.zero_()
        self.steps = 0

    def __repr__(self) -> str:
        return f"MovementTracker(weights={len(self._weights)}, steps={self.steps})"

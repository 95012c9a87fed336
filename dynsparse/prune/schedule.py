"""Pruning schedules: pure functions ``step -> target sparsity``, and `IterativePruner`, which follows one.

Every schedule returns the *sparsity* (fraction removed) to reach at ``step``, and is constant before it
starts and after it ends. Bind the hyper-parameters with ``functools.partial`` to get a ``step -> sparsity``
function::

    schedule = functools.partial(agp, initial=0.0, final=0.9, begin=0, end=10_000, frequency=100)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .unstructured import _check_fraction, reapply_masks_on_step, unstructured_

__all__ = ["IterativePruner", "agp", "exponential", "linear", "one_shot"]

log = logging.getLogger(__name__)


def _check_span(begin: int, end: int) -> None:
    if end <= begin:
        raise ConfigError(f"schedule: end ({end}) must be greater than begin ({begin})")


def _clamp(value: float, a: float, b: float) -> float:
    """``value`` clamped to the interval between ``a`` and ``b`` (guards against float rounding)."""
    return min(max(value, min(a, b)), max(a, b))


def one_shot(step: int, final: float, at: int = 0) -> float:
    """``0.0`` before step ``at``, ``final`` from it on."""
    final = _check_fraction(final, "final")
    return final if step >= at else 0.0


def linear(step: int, initial: float, final: float, begin: int, end: int) -> float:
    """Linear ramp: ``initial`` up to ``begin``, ``final`` from ``end`` on, a straight line in between."""
    initial, final = _check_fraction(initial, "initial"), _check_fraction(final, "final")
    _check_span(begin, end)
    if step <= begin:
        return initial
    if step >= end:
        return final
    return _clamp(initial + (final - initial) * (step - begin) / (end - begin), initial, final)


def agp(step: int, initial: float, final: float, begin: int, end: int, frequency: int = 1) -> float:
    """Automated gradual pruning (Zhu & Gupta 2017): a cubic ramp from ``initial`` to ``final``.

    ``s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(nΔt))³`` with ``t0 = begin`` and ``nΔt = end − begin``; ``s_i``
    up to ``begin``, ``s_f`` from ``end`` on. The target changes only every ``frequency`` steps (at ``begin``,
    ``begin + frequency``, ...; piecewise constant in between) and at ``end``, where it is exactly ``final``
    even when ``frequency`` does not divide ``end − begin``.

    Args:
        step: Current step (or epoch).
        initial: Sparsity at and before ``begin`` (usually 0).
        final: Sparsity from ``end`` on.
        begin: First step of the ramp.
        end: Step at which ``final`` is reached (> ``begin``).
        frequency: Steps between updates (Δt), >= 1.

    Examples:
        >>> agp(0, 0.0, 0.9, 0, 100), agp(50, 0.0, 0.9, 0, 100), agp(100, 0.0, 0.9, 0, 100)
        (0.0, 0.7875, 0.9)
    """
    initial, final = _check_fraction(initial, "initial"), _check_fraction(final, "final")
    _check_span(begin, end)
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ConfigError(f"agp: frequency must be an integer >= 1, got {frequency!r}")
    if step <= begin:
        return initial
    if step >= end:
        return final
    t = begin + (step - begin) // frequency * frequency
    if t == begin:
        return initial
    return _clamp(final + (initial - final) * (1.0 - (t - begin) / (end - begin)) ** 3, initial, final)


def exponential(step: int, final_density: float, n: int) -> float:
    """Exponential schedule of SynFlow-style iterative pruning: after round ``k`` of ``n``, density ``d_f^(k/n)``.

    Returns the *sparsity* ``1 − final_density ** (k / n)`` for ``k = step`` clamped to ``[0, n]``: 0.0 at
    ``step <= 0`` and ``1 − final_density`` from ``step >= n`` on. Each round keeps the same fraction of the
    remaining weights.

    Args:
        step: Pruning round ``k``.
        final_density: Fraction of weights kept after ``n`` rounds, in (0, 1].
        n: Number of rounds, >= 1.
    """
    if isinstance(final_density, bool) or not isinstance(final_density, (int, float)) or not 0 < final_density <= 1:
        raise ConfigError(f"exponential: final_density must be in (0, 1], got {final_density!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"exponential: n must be an integer >= 1, got {n!r}")
    if step <= 0:
        return 0.0
    if step >= n:
        return 1.0 - final_density
    return 1.0 - final_density ** (step / n)


Importance = str | Mapping[str, Tensor] | Callable[[nn.Module], Mapping[str, Tensor]]


class IterativePruner:
    """Prunes a model along a schedule: ``step(t)`` calls `unstructured_` whenever the target sparsity changes.

    Masks only grow (see `unstructured_`), so each call reaches the schedule's sparsity exactly as long as the
    schedule does not decrease. Give the ``optimizer`` to keep the pruned raw weights at 0 between pruning steps
    too (momentum and Adam's moments move them otherwise; see `reapply_masks_on_step`).

    Args:
        model: The model to prune in place.
        schedule: ``step -> sparsity``, e.g. ``functools.partial(agp, initial=0, final=0.9, begin=0, end=1000)``.
        importance: ``"magnitude"``, fixed ``{param_fqn: scores}``, or a callable ``model -> {param_fqn: scores}``
            called at each pruning step (for scores that depend on the current weights or gradients).
        scope: ``"global"`` or ``"layer"`` (see `unstructured_`).
        include: fqn globs of the modules to prune.
        exclude: fqn globs of the modules left alone.
        layers: Host classes to prune (exact types).
        optimizer: The optimizer training ``model``: masked weights are set back to 0 after each of its steps
            (the hook's handle is ``step_hook``; None: only at pruning steps).

    Examples:
        >>> import functools
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> pruner = IterativePruner(model, functools.partial(linear, initial=0.0, final=0.5, begin=0, end=4))
        >>> [pruner.step(t) for t in range(6)]
        [True, True, True, True, True, False]
        >>> pruner.target
        0.5
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Callable[[int], float],
        *,
        importance: Importance = "magnitude",
        scope: Literal["global", "layer"] = "global",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        layers: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not callable(schedule):
            raise ConfigError(f"IterativePruner: schedule must be a callable step -> sparsity, got {schedule!r}")
        self.model = model
        self.schedule = schedule
        self.importance = importance
        self.scope = scope
        self.include = include
        self.exclude = exclude
        self.layers = layers
        #: The sparsity applied last (None before the first `step`).
        self.target: float | None = None
        #: Handle of the optimizer hook that keeps masked weights at 0 (None without ``optimizer``).
        self.step_hook = None if optimizer is None else reapply_masks_on_step(optimizer, model)

    def step(self, step: int) -> bool:
        """Prune to ``schedule(step)`` if it differs from the last target; return whether it pruned."""
        target = float(self.schedule(step))
        if self.target is not None and target == self.target:
            return False
        importance = self.importance
        if callable(importance) and not isinstance(importance, (str, Mapping)):
            importance = importance(self.model)
        unstructured_(
            self.model,
            target,
            importance=importance,
            scope=self.scope,
            include=self.include,
            exclude=self.exclude,
            layers=self.layers,
        )
        log.debug("IterativePruner: step %d, sparsity %.4f", step, target)
        self.target = target
        return True

    def state_dict(self) -> dict[str, Any]:
        """The pruner's state (the last target), for resuming; masks live in the model's state dict."""
        return {"target": self.target}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict` output."""
        self.target = state["target"]

"""Gate base classes: the one seam between what decides sparsity and what acts on it."""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import GateError

__all__ = ["Gate", "InputDependentGate"]


class Gate(nn.Module):
    """A static (input-independent) gate over ``num_units`` units of one dimension.

    Contract:
        * ``forward()`` returns a (num_units,) multiplier: stochastic or straight-through in training,
          deterministic in eval.
        * ``keep_mask()`` returns the (num_units,) bool mask of units that conversion keeps.
        * ``eval_values()`` returns the deterministic (num_units,) multiplier used in eval; where it is not
          0/1, conversion folds it into the consumer weights.
        * ``penalty()`` returns a scalar regulariser (0 when the gate has none).
        * ``expected_keep()`` returns the (num_units,) probability that each unit is kept (for budgets).
        * A gate built with default arguments is *open*: every unit kept with multiplier 1.

    Args:
        num_units: Number of units the gate owns (> 0).
    """

    num_units: int
    #: Range of the training-mode multiplier (eval values are always in [0, 1]); noise gates may exceed it.
    train_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __init__(self, num_units: int) -> None:
        super().__init__()
        self.num_units = _check_num_units(type(self).__name__, num_units)

    def forward(self) -> Tensor:
        """(num_units,) multiplier for this forward pass."""
        return self.eval_values()

    def eval_values(self) -> Tensor:
        """(num_units,) deterministic multiplier used in eval."""
        raise NotImplementedError

    def keep_mask(self) -> Tensor:
        """(num_units,) bool mask of the units that conversion keeps."""
        with torch.no_grad():
            return self.eval_values() > 0

    def expected_keep(self) -> Tensor:
        """(num_units,) probability that each unit is kept; defaults to the keep mask as float."""
        return self.keep_mask().to(self._dtype())

    def penalty(self) -> Tensor:
        """Scalar regulariser; 0 for gates without one."""
        return torch.zeros((), dtype=self._dtype(), device=self._device())

    def _dtype(self) -> torch.dtype:
        return _state_dtype(self)

    def _device(self) -> torch.device:
        return _state_device(self)

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}"


class InputDependentGate(nn.Module):
    """Base of gates whose decision depends on the input (tokens, per-sample channels, routers).

    Contract:
        * ``forward(x)`` returns a (B, num_units) multiplier (0 for units skipped for that sample).
        * ``keep`` is the run-time budget (fraction kept); ``set_budget_(keep)`` changes it without retraining.
        * There is no static ``keep_mask()``: the converter keeps such gates as run-time skip modules.
        * ``penalty()`` returns a scalar regulariser (0 when none).

    Args:
        num_units: Number of units per sample the gate decides over (> 0).
        keep: Fraction of units kept at inference, in (0, 1].
    """

    num_units: int

    def __init__(self, num_units: int, keep: float = 1.0) -> None:
        super().__init__()
        self.num_units = _check_num_units(type(self).__name__, num_units)
        self.keep = _check_keep(type(self).__name__, keep)

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_budget_(self, keep: float) -> InputDependentGate:
        """Set the fraction of units kept at inference; returns self."""
        self.keep = _check_keep(type(self).__name__, keep)
        return self

    def num_kept(self) -> int:
        """Units kept per sample under the current budget (at least one)."""
        return max(1, math.floor(self.keep * self.num_units + 0.5))

    def penalty(self) -> Tensor:
        """Scalar regulariser; 0 for gates without one (on the device of the gate's parameters, else its buffers)."""
        return torch.zeros((), dtype=_state_dtype(self), device=_state_device(self))

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, keep={self.keep}"


def _state_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of the first parameter of ``module``, else of its first floating buffer, else the default dtype."""
    for t in module.parameters():
        return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _state_device(module: nn.Module) -> torch.device:
    """Device of the first parameter of ``module``, else of its first buffer (buffers only: CATS), else the CPU."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _check_num_units(owner: str, num_units: int) -> int:
    """``num_units`` as a plain int: any integral number (``int``, ``numpy.int64``...) > 0, never a bool."""
    if isinstance(num_units, bool) or not isinstance(num_units, numbers.Integral) or num_units <= 0:
        raise GateError(f"{owner}: num_units must be a positive int, got {num_units!r}")
    return int(num_units)


def _check_keep(owner: str, keep: float) -> float:
    """``keep`` as a plain float: any real number (``float``, ``numpy.float32``...) in (0, 1], never a bool.

    NaN and infinities fail the range check.
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < float(keep) <= 1.0:
        raise GateError(f"{owner}: keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)

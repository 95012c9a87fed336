"""Fixed gate: a frozen keep mask (what classic pruning and lottery tickets record)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import GateError
from .base import Gate

__all__ = ["FixedGate"]


class FixedGate(Gate):
    """A frozen mask, optionally with frozen non-binary multipliers; no parameters, no penalty.

    Args:
        num_units: Number of units.
        mask: (num_units,) bool keep mask (default: all kept). Copied; stored in the state dict as ``mask``.
        values: Optional (num_units,) float multipliers of the kept units (default 1). Copied; stored as ``values``.
        device: Device of the buffers (default: that of ``mask``, else of ``values``, else the CPU).
        dtype: Dtype of ``values``.

    Examples:
        >>> FixedGate(3, mask=torch.tensor([True, False, True]))()
        tensor([1., 0., 1.])
    """

    def __init__(
        self,
        num_units: int,
        mask: Tensor | None = None,
        values: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units)
        if device is None:  # one device for both buffers: that of the tensors given (a GPU mask, CPU default values)
            device = next((t.device for t in (mask, values) if isinstance(t, Tensor)), None)
        mask = torch.ones(num_units, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        if mask.shape != (num_units,) or mask.dtype != torch.bool:
            raise GateError(
                f"FixedGate: mask must be a bool tensor of shape ({num_units},), got {mask.dtype} {tuple(mask.shape)}"
            )
        values = torch.ones(num_units) if values is None else torch.as_tensor(values)
        if values.shape != (num_units,) or not values.is_floating_point():
            raise GateError(f"FixedGate: values must be a float tensor of shape ({num_units},)")
        # copies: the gate owns its state, so gates fixed from one masks dict never share (or change) the caller's
        self.register_buffer("mask", mask.detach().to(device=device, copy=True))
        self.register_buffer("values", values.detach().to(device=device, dtype=dtype or values.dtype, copy=True))

    def eval_values(self) -> Tensor:
        return self.values * self.mask.to(self.values.dtype)

    def keep_mask(self) -> Tensor:
        return self.mask.clone()

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, kept={int(self.mask.sum())}"

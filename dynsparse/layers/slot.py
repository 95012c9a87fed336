"""``GateSlot``: applies a static gate's multiplier along one axis of a tensor."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import GateError
from ..gates import Gate
from ..modules import is_stateless

__all__ = ["GateSlot"]


class GateSlot(nn.Module):
    """Multiplies ``inner(x)`` by a gate's per-unit multiplier, broadcast along ``dim``.

    A slot takes the place of a parameter-free child of a host layer (an ``Identity``, an activation, a
    ``DropPath``) that sits exactly where removing a unit is exact, so the host's own ``forward`` runs
    unchanged and the only new state-dict keys are ``<slot>.gate.*``.

    Args:
        gate: The gate; its ``num_units * unit_size`` must equal ``x.shape[dim]``.
        dimension: The dimension word (``"neurons"``, ``"heads"``, ``"channels"``, ``"layers"``).
        dim: Axis of ``x`` the units lie on (``-1`` channels-last, ``1`` for NCHW).
        unit_size: Consecutive elements per unit (``head_dim`` for heads; 0 for a scalar branch gate).
        inner: The parameter-free module the slot replaces, applied first (``None`` for identity).
        scope: Names of the parent's children whose FLOPs scale with the kept fraction ("" = the whole parent).

    Shapes:
        x: any shape with ``x.shape[dim] == num_units * unit_size`` (or any shape when ``unit_size == 0``).
    """

    def __init__(
        self,
        gate: Gate,
        *,
        dimension: str,
        dim: int = -1,
        unit_size: int = 1,
        inner: nn.Module | None = None,
        scope: tuple[str, ...] = ("",),
    ) -> None:
        super().__init__()
        if not isinstance(gate, Gate):
            raise GateError(f"GateSlot needs a Gate, got {type(gate).__name__}")
        if unit_size == 0 and gate.num_units != 1:
            raise GateError(f"a branch gate (unit_size=0) must have one unit, got {gate.num_units}")
        if inner is not None and not is_stateless(inner):
            raise GateError(f"GateSlot can only wrap a module without state, got {type(inner).__name__}")
        self.gate = gate
        self.inner = inner  # the original child (None, Identity, an activation, a DropPath), restored on conversion
        self._apply_inner = inner is not None and not isinstance(inner, nn.Identity)
        self.dimension = dimension
        self.dim = dim
        self.unit_size = unit_size
        self.scope = tuple(scope)

    def forward(self, x: Tensor) -> Tensor:
        if self._apply_inner:
            x = self.inner(x)
        m = self.gate().to(x.dtype)
        if self.unit_size == 0:
            return x * m
        if self.unit_size > 1:
            m = m.repeat_interleave(self.unit_size)
        dim = self.dim % x.ndim
        shape = [1] * x.ndim
        shape[dim] = m.shape[0]
        return x * m.view(shape)

    def extra_repr(self) -> str:
        return f"dimension={self.dimension!r}, dim={self.dim}, unit_size={self.unit_size}"

"""``layers`` gates: one scalar gate on each residual branch, in the branch's ``drop_path`` slot.

A closed branch gate makes the block compute ``x + 0`` for that branch, so the converter can remove the
branch. The host block keeps its class and its ``forward``; only its ``drop_path`` child becomes a slot.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModuleError
from ..gates import GateSpec, make_gate
from ..modules import first_param
from .slot import GateSlot

__all__ = ["Branch", "gate_branches_"]


class Branch:
    """A residual branch of a host block.

    Args:
        slot: Name of the parameter-free child applied last on the branch (e.g. ``"drop_path1"``).
        scope: Children that make up the branch (their FLOPs disappear when the branch is closed).
    """

    __slots__ = ("scope", "slot")

    def __init__(self, slot: str, scope: Sequence[str]) -> None:
        self.slot, self.scope = slot, tuple(scope)


def gate_branches_(block: nn.Module, branches: Sequence[Branch], gate: GateSpec, fqn: str = "") -> nn.Module:
    """Install a one-unit ``layers`` gate in each branch's slot of ``block`` (in place); returns ``block``.

    Raises:
        UnsupportedModuleError: a slot is missing, holds parameters, or is already gated.
    """
    ref = first_param(block)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
    for br in branches:
        if not hasattr(block, br.slot):
            raise UnsupportedModuleError(fqn, type(block).__name__, "layers", f"it has no {br.slot!r} child")
        inner = getattr(block, br.slot)
        if isinstance(inner, GateSlot):
            raise UnsupportedModuleError(fqn, type(block).__name__, "layers", f"{br.slot!r} is already gated")
        if inner is not None and len(inner.state_dict()) > 0:
            raise UnsupportedModuleError(fqn, type(block).__name__, "layers", f"{br.slot!r} holds parameters")
        g = make_gate(gate, 1, device=device, dtype=dtype)
        slot = GateSlot(g, dimension="layers", unit_size=0, inner=inner, scope=br.scope)
        setattr(block, br.slot, slot.train(block.training))
    return block

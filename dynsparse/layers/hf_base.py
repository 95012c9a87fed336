"""Shared machinery of the gated Hugging Face layers: gate carriers and the `HFGatedLayer` mixin.

Hugging Face modules have no parameter-free child where a gate could sit exactly (the head outputs go straight
from the attention kernel into ``o_proj``), so a gate sits on the *input* or *output* of a weight layer instead:
the weight layer becomes a *carrier*, a subclass of its own class (``nn.Linear`` or GPT-2's ``Conv1D``) that
shares its parameters and applies a `GateSlot` child called ``gate_in`` before, or ``gate_out`` after, its own
``forward``. Host checkpoints load unchanged (only ``*.gate_in.gate.*`` / ``*.gate_out.gate.*`` keys are new) and
the host modules keep their own ``forward``.

A gated HF layer (``GatedLlamaAttention(HFGatedLayer, LlamaAttention)``) owns producer and consumer of its
dimension; its slots are named by their path below it (``"o_proj.gate_in"``), so conversion stays local.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..convert.surgery import slice_linear_in_, slice_linear_out_, slice_param_
from ..errors import UnsupportedModuleError
from ..gates import GateSpec, make_gate
from ..modules import adopt, first_param, successor_state
from .base import GatedLayer, Producer
from .slot import GateSlot

__all__ = [
    "IN",
    "OUT",
    "GatedConv1D",
    "GatedLinear",
    "HFGatedLayer",
    "carry_",
    "head_elements",
    "is_carrier",
    "out_producers",
    "slice_in_",
    "slice_out_",
    "uncarry",
]

#: Names of the two gate slots a carrier can hold.
IN, OUT = "gate_in", "gate_out"


class _Carrier:
    """Mixin of a weight layer that gates its input (``gate_in``) and / or its output (``gate_out``)."""

    host_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        gin = self._modules.get(IN)  # type: ignore[attr-defined]
        if gin is not None:
            x = gin(x)
        y = super().forward(x)  # type: ignore[misc]
        gout = self._modules.get(OUT)  # type: ignore[attr-defined]
        return gout(y) if gout is not None else y


class GatedLinear(_Carrier, nn.Linear):
    """``nn.Linear`` carrying a gate on its input and / or output (children ``gate_in`` / ``gate_out``)."""

    host_class = nn.Linear


class GatedConv1D(_Carrier, Conv1D):
    """GPT-2's ``Conv1D`` (weight ``(in, out)``) carrying a gate on its input and / or output."""

    host_class = Conv1D

    def __repr__(self) -> str:  # Conv1D's own repr hides children
        return nn.Module.__repr__(self)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


_CARRIERS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: GatedLinear, Conv1D: GatedConv1D}


def _set_path(root: nn.Module, path: str, new: nn.Module, copy_parents: bool) -> None:
    """Put ``new`` at ``path`` below ``root``; ``copy_parents`` shallow-copies the modules on the way (so a host
    that shares them with ``root`` is not changed)."""
    parent = root
    *heads, last = path.split(".")
    for name in heads:
        child = parent._modules[name]
        if copy_parents:
            child = adopt(child, type(child), share_hooks=False)  # a copy next to the host: its own hooks
            parent._modules[name] = child
        parent = child
    setattr(parent, last, new)


def carry_(root: nn.Module, path: str, side: str, slot: GateSlot, copy_parents: bool = False) -> None:
    """Install ``slot`` as the ``side`` (`IN` or `OUT`) gate of the weight layer at ``path`` below ``root``.

    Raises:
        UnsupportedModuleError: the module at ``path`` is not an ``nn.Linear`` / ``Conv1D``, or already has that gate.
    """
    m = root.get_submodule(path)
    if isinstance(m, _Carrier):
        if m._modules.get(side) is not None:
            raise UnsupportedModuleError(path, type(m).__name__, slot.dimension, f"its {side!r} is already gated")
        new = adopt(m, type(m), share_hooks=not copy_parents)
    else:
        cls = _CARRIERS.get(type(m))
        if cls is None:
            raise UnsupportedModuleError(
                path, type(m).__name__, slot.dimension, "a gate sits only on an nn.Linear or a transformers Conv1D"
            )
        new = adopt(m, cls, share_hooks=not copy_parents)  # a copy next to the host keeps its own hooks
    new._modules = dict(new._modules)
    setattr(new, side, slot)
    _set_path(root, path, new, copy_parents)


def is_carrier(m: nn.Module | None) -> bool:
    """True for a weight layer carrying gates (`GatedLinear`, `GatedConv1D`)."""
    return isinstance(m, _Carrier)


def uncarry(m: nn.Module, side: str, share_hooks: bool = True) -> nn.Module:
    """``m`` without its ``side`` gate: the plain host-class layer (sharing parameters) once it has no gate left.

    ``share_hooks``: the result takes over ``m``'s hook dicts (it replaces ``m``); False for a copy beside it.
    """
    if not isinstance(m, _Carrier):
        return m
    modules = {k: v for k, v in m._modules.items() if k != side}
    if any(v is not None for v in modules.values()):
        new = adopt(m, type(m), share_hooks=share_hooks)
    else:
        new = m.host_class.__new__(m.host_class)
        new.__dict__.update(successor_state(m, share_hooks=share_hooks))
        modules = {}
    new._modules = modules
    return new


def uncarry_path_(root: nn.Module, path: str, side: str) -> None:
    """Remove the ``side`` gate of the carrier at ``path`` below ``root`` (in place)."""
    _set_path(root, path, uncarry(root.get_submodule(path), side), copy_parents=False)


# ---------------------------------------------------------------------------------------------------------------
# Slicing and producer weights of nn.Linear and Conv1D (whose weight is (in, out)).


def slice_out_(m: nn.Module, idx: Tensor) -> None:
    """Keep output features ``idx`` of an ``nn.Linear`` or ``Conv1D`` (in place, size attributes updated)."""
    if isinstance(m, Conv1D):
        slice_param_(m, "weight", idx, 1)
        slice_param_(m, "bias", idx, 0)
        m.nf = len(idx)
    else:
        slice_linear_out_(m, idx)


def slice_in_(m: nn.Module, idx: Tensor, scale: Tensor | None = None) -> None:
    """Keep input features ``idx`` of an ``nn.Linear`` or ``Conv1D``, scaling them by ``scale``."""
    if isinstance(m, Conv1D):
        slice_param_(m, "weight", idx, 0, scale)
        m.nx = len(idx)
    else:
        slice_linear_in_(m, idx, scale)


def scale_out_(m: nn.Module, v: float) -> None:
    """Multiply the output of an ``nn.Linear`` / ``Conv1D`` by ``v`` (weight and bias)."""
    with torch.no_grad():
        m.weight.mul_(v)
        if m.bias is not None:
            m.bias.mul_(v)


def out_features(m: nn.Module) -> int:
    return m.nf if isinstance(m, Conv1D) else m.out_features


def in_features(m: nn.Module) -> int:
    return m.nx if isinstance(m, Conv1D) else m.in_features


def out_producers(root: nn.Module, path: str, index: Tensor) -> list[Producer]:
    """Producers of the output features ``index`` (``(num_units, k)``) of the layer at ``path`` below ``root``."""
    m = root.get_submodule(path)
    out = [Producer(f"{path}.weight", 1 if isinstance(m, Conv1D) else 0, index)]
    if getattr(m, "bias", None) is not None:
        out.append(Producer(f"{path}.bias", 0, index))
    return out


def head_elements(heads: Tensor, head_dim: int) -> Tensor:
    """Feature indices ``h * head_dim + j`` of the given heads, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


# ---------------------------------------------------------------------------------------------------------------


class HFGatedLayer(GatedLayer):
    """Mixin of the gated Hugging Face layers: slots live in carriers below the layer, named by path.

    Subclasses list their slots in ``_slot_specs`` with ``child`` set to ``"<weight layer path>.gate_in"`` (or
    ``.gate_out``) and implement ``slice_`` / ``producers`` like every `GatedLayer`. ``from_module`` shallow-copies
    the modules on the way to a carrier, so the host is never changed.
    """

    def _install_gates(self, gate: GateSpec) -> None:
        reason = self.unsupported_reason(self)  # type: ignore[arg-type]
        if reason is not None:
            raise UnsupportedModuleError("", type(self).__name__, self.dimension, reason)
        ref = first_param(self)  # type: ignore[arg-type]
        device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
        self._modules = dict(self._modules)  # type: ignore[attr-defined]
        for spec in self._slot_specs(self):  # type: ignore[arg-type]
            path, _, side = spec.child.rpartition(".")
            g = make_gate(gate, spec.num_units, device=device, dtype=dtype)
            slot = GateSlot(g, dimension=self.dimension, dim=spec.dim, unit_size=spec.unit_size, scope=spec.scope)
            carry_(self, path, side, slot.train(self.training), copy_parents=True)  # type: ignore[arg-type]

    def gate_slots(self) -> Iterator[tuple[str, GateSlot]]:
        """``(path, slot)`` for every gate slot of this layer (paths like ``"o_proj.gate_in"``)."""
        for spec in self._slot_specs(self):  # type: ignore[arg-type]
            slot = _get(self, spec.child)  # type: ignore[arg-type]
            if isinstance(slot, GateSlot) and slot.dimension == self.dimension:
                yield spec.child, slot

    def to_host(self) -> nn.Module:
        """A host-class module sharing this layer's parameters, without this layer's gates."""
        host = self.host_class.__new__(self.host_class)
        host.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in self.__dict__.items()})
        for child, _ in list(self.gate_slots()):
            path, _, side = child.rpartition(".")
            _set_path(host, path, uncarry(host.get_submodule(path), side, share_hooks=False), copy_parents=True)
        return host


def _get(root: nn.Module, path: str) -> Any:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None

"""``GatedLayer``: the mixin that turns a host layer class into a drop-in gated layer class."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..gates import GateSpec, make_gate
from ..modules import adopt, first_param, successor_state
from .slot import GateSlot

__all__ = ["GatedLayer", "Producer", "SlotSpec", "unit_rows", "unit_weights"]


class SlotSpec:
    """Where one gate of a gated layer goes.

    Args:
        child: Name of the parameter-free child the slot replaces (e.g. ``"norm"``, ``"act1"``, ``"aa"``).
        num_units: Number of units of the gate.
        dim: Axis of the tensor at that child the units lie on.
        unit_size: Consecutive elements per unit (``head_dim`` for heads).
        scope: Children whose FLOPs scale with this gate's kept fraction.
    """

    __slots__ = ("child", "dim", "num_units", "scope", "unit_size")

    def __init__(self, child: str, num_units: int, dim: int = -1, unit_size: int = 1, scope: tuple[str, ...] = ("",)):
        self.child, self.num_units, self.dim, self.unit_size, self.scope = child, num_units, dim, unit_size, scope


class Producer(NamedTuple):
    """Where the weights of each unit of a gate live in one parameter of the layer.

    ``param`` is the parameter's name relative to the layer, ``dim`` the axis the units lie on and ``index``
    a ``(num_units, k)`` tensor: unit ``j`` owns ``param.index_select(dim, index[j])``.
    """

    param: str
    dim: int
    index: Tensor


def unit_weights(layer: nn.Module, p: Producer) -> Tensor:
    """``(num_units, k)`` copy of the weights producer ``p`` assigns to each unit of ``layer`` (differentiable).

    The weight the forward uses: a masked producer's ``masked_weight()`` (`dynsparse.prune.unstructured_`; an
    optimizer with momentum may have moved its raw ``weight`` under the mask), else the parameter itself.
    """
    owner_fqn, _, name = p.param.rpartition(".")
    owner = layer.get_submodule(owner_fqn)
    masked = getattr(owner, "masked_weight", None) if name == "weight" else None
    w = masked() if callable(masked) else layer.get_parameter(p.param)
    idx = p.index.to(w.device)
    return w.index_select(p.dim, idx.flatten()).movedim(p.dim, 0).reshape(idx.shape[0], -1)


def unit_rows(n: int, per_unit: int = 1, offsets: tuple[int, ...] = (0,)) -> Tensor:
    """``(n, per_unit * len(offsets))`` index: unit ``j`` owns rows ``o + j * per_unit + i`` for each offset ``o``."""
    base = torch.arange(n)[:, None] * per_unit + torch.arange(per_unit)[None, :]
    return torch.cat([base + o for o in offsets], dim=1)


class GatedLayer:
    """Mixin for gated subclasses of host layers (``class GatedMlp(GatedLayer, Mlp)``).

    A gated layer keeps the host's constructor arguments (plus ``gate``), child names and ``forward``: its
    gates sit in `GateSlot` children that replace parameter-free children of the host, so host
    checkpoints load and only ``*.gate.*`` keys are new. Built with default gate arguments every gate is
    open and the output equals the host's.

    Subclasses set ``host_class`` and ``dimension`` and implement ``_slot_specs`` (where the gates go) and
    optionally ``unsupported_reason`` (a host configuration the gate cannot be exact for) and ``input_slots``.
    """

    host_class: ClassVar[type[nn.Module]]
    dimension: ClassVar[str]
    #: Slots whose units are the layer's *input* channels: converting them also slices the producer of the
    #: layer's input, outside the layer (found by `dynsparse.convert.producer.input_producers`).
    input_slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, gate: GateSpec = "hard_concrete", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the host's own constructor
        self._install_gates(gate)

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        """Why ``host`` cannot be gated exactly (``None`` when it can)."""
        return None

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        raise NotImplementedError

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        """Keep units ``idx`` (sorted, non-empty) of the gate at ``child`` by slicing producer and consumer.

        Works on a host module or a gated one (same children), in place. ``scale`` (one value per kept unit)
        is folded into the consumer weights; ``None`` leaves the weights as they are (shape-only replay).
        """
        raise NotImplementedError

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        """The producer weights of each unit of the gate at ``child`` (for group lasso and importance scores)."""
        raise NotImplementedError

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        """Name of the BatchNorm whose channels are the gate's units (network slimming), or None."""
        return None

    @classmethod
    def from_module(cls, host: nn.Module, gate: GateSpec = "hard_concrete", fqn: str = "") -> GatedLayer:
        """Make the gated twin of ``host``; it shares the host's parameters (no copy) and starts open.

        Args:
            host: A module whose exact type is ``host_class``.
            gate: Gate spec for every gate of the layer (see `dynsparse.gates.make_gate`).
            fqn: Qualified name of ``host`` in its model, used in error messages.

        Raises:
            UnsupportedModuleError: ``host`` has the wrong type or a configuration that cannot be gated exactly.
        """
        if type(host) is not cls.host_class:
            raise UnsupportedModuleError(
                fqn, type(host).__name__, cls.dimension, f"{cls.__name__} wraps only {cls.host_class.__name__}"
            )
        reason = cls.unsupported_reason(host)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(host).__name__, cls.dimension, reason)
        new = adopt(host, cls)
        new._install_gates(gate)
        return new

    def _install_gates(self, gate: GateSpec) -> None:
        reason = self.unsupported_reason(self)  # type: ignore[arg-type]
        if reason is not None:
            raise UnsupportedModuleError("", type(self).__name__, self.dimension, reason)
        ref = first_param(self)  # type: ignore[arg-type]
        device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
        for spec in self._slot_specs(self):  # type: ignore[arg-type]
            g = make_gate(gate, spec.num_units, device=device, dtype=dtype)
            slot = GateSlot(
                g,
                dimension=self.dimension,
                dim=spec.dim,
                unit_size=spec.unit_size,
                inner=getattr(self, spec.child),
                scope=spec.scope,
            )
            setattr(self, spec.child, slot.train(self.training))  # type: ignore[attr-defined]

    def gate_slots(self) -> Iterator[tuple[str, GateSlot]]:
        """``(child_name, slot)`` for every gate slot of this layer."""
        for name, child in self.named_children():  # type: ignore[attr-defined]
            if isinstance(child, GateSlot) and child.dimension == self.dimension:
                yield name, child

    def to_host(self) -> nn.Module:
        """A host-class module sharing this layer's parameters with the gate slots removed (gates ignored)."""
        host = self.host_class.__new__(self.host_class)
        state = successor_state(self)  # hook dicts shared: handles registered on this layer keep working
        host.__dict__.update(state)
        for name, slot in list(self.gate_slots()):
            host._modules[name] = slot.inner
        return host

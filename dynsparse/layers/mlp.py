"""Gated timm MLPs: a ``neurons`` gate on the hidden units, between the activation and ``fc2``."""

from __future__ import annotations

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import Tensor, nn

from ..convert.surgery import slice_linear_in_, slice_linear_out_
from .base import GatedLayer, Producer, SlotSpec, unit_rows

__all__ = ["GatedGluMlp", "GatedMlp", "GatedSwiGLU"]


def _hidden_slot(m: nn.Module) -> SlotSpec:
    fc2 = m.fc2
    conv = isinstance(fc2, nn.Conv2d)
    units = fc2.in_channels if conv else fc2.in_features
    return SlotSpec("norm", units, dim=1 if conv else -1, scope=("",))


def _with_bias(layer: nn.Module, name: str, idx: Tensor) -> list[Producer]:
    out = [Producer(f"{name}.weight", 0, idx)]
    if getattr(layer, "bias", None) is not None:
        out.append(Producer(f"{name}.bias", 0, idx))
    return out


class _GatedHidden(GatedLayer):
    """Shared rules of the timm MLPs: the gate takes the place of the (Identity) hidden ``norm``."""

    dimension = "neurons"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if not isinstance(host.norm, nn.Identity):
            return (
                f"its hidden norm ({type(host.norm).__name__}) normalises over all hidden units, so removing "
                "a unit is not exact"
            )
        return None

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [_hidden_slot(host)]


class GatedMlp(_GatedHidden, Mlp):
    """timm ``Mlp`` with a ``neurons`` gate after ``act``/``drop1`` (in the ``norm`` slot, before ``fc2``).

    Same constructor arguments as ``timm.layers.Mlp`` plus ``gate``; pass it as ``mlp_layer`` to a timm
    model, or make it from an existing ``Mlp`` with `from_module`.

    Examples:
        >>> import torch, timm.layers
        >>> host = timm.layers.Mlp(8, 32)
        >>> gated = GatedMlp.from_module(host, gate="hard_concrete").eval()
        >>> x = torch.randn(2, 5, 8)
        >>> torch.equal(gated(x), host(x))
        True
    """

    host_class = Mlp

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        idx = unit_rows(_hidden_slot(module).num_units)
        return _with_bias(module.fc1, "fc1", idx)

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        slice_linear_out_(module.fc1, idx)
        slice_linear_in_(module.fc2, idx, scale)


class GatedGluMlp(_GatedHidden, GluMlp):
    """timm ``GluMlp`` with a ``neurons`` gate on the gated product, before ``fc2`` (``norm`` slot)."""

    host_class = GluMlp

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        h = _hidden_slot(module).num_units
        return _with_bias(module.fc1, "fc1", unit_rows(h, offsets=(0, h)))

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        hidden = _hidden_slot(module).num_units
        slice_linear_out_(module.fc1, torch.cat([idx, idx + hidden]))  # fc1 holds both halves of the GLU
        slice_linear_in_(module.fc2, idx, scale)


class GatedSwiGLU(_GatedHidden, SwiGLU):
    """timm ``SwiGLU`` with a ``neurons`` gate on ``act(fc1_g(x)) * fc1_x(x)``, before ``fc2`` (``norm`` slot)."""

    host_class = SwiGLU

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        idx = unit_rows(_hidden_slot(module).num_units)
        return _with_bias(module.fc1_g, "fc1_g", idx) + _with_bias(module.fc1_x, "fc1_x", idx)

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        slice_linear_out_(module.fc1_g, idx)
        slice_linear_out_(module.fc1_x, idx)
        slice_linear_in_(module.fc2, idx, scale)

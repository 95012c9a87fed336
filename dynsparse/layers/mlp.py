"""Gated timm MLPs: a ``neurons`` gate on the hidden units, between the activation and ``fc2``."""

from __future__ import annotations

from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from .base import GatedLayer, SlotSpec

__all__ = ["GatedGluMlp", "GatedMlp", "GatedSwiGLU"]


def _hidden_slot(m: nn.Module) -> SlotSpec:
    fc2 = m.fc2
    conv = isinstance(fc2, nn.Conv2d)
    units = fc2.in_channels if conv else fc2.in_features
    return SlotSpec("norm", units, dim=1 if conv else -1, scope=("",))


def _norm_reason(m: nn.Module) -> str | None:
    if not isinstance(m.norm, nn.Identity):
        return (
            f"its hidden norm ({type(m.norm).__name__}) normalises over all hidden units, so removing a unit "
            "is not exact"
        )
    return None


class GatedMlp(GatedLayer, Mlp):
    """timm ``Mlp`` with a ``neurons`` gate after ``act``/``drop1`` (in the ``norm`` slot, before ``fc2``).

    Same constructor arguments as ``timm.layers.Mlp`` plus ``gate``; pass it as ``mlp_layer`` to a timm
    model, or make it from an existing ``Mlp`` with :meth:`from_module`.

    Example:
        >>> import torch, timm.layers
        >>> host = timm.layers.Mlp(8, 32)
        >>> gated = GatedMlp.from_module(host, gate="hard_concrete").eval()
        >>> x = torch.randn(2, 5, 8)
        >>> torch.equal(gated(x), host(x))
        True
    """

    host_class = Mlp
    dimension = "neurons"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _norm_reason(host)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [_hidden_slot(host)]


class GatedGluMlp(GatedLayer, GluMlp):
    """timm ``GluMlp`` with a ``neurons`` gate on the gated product, before ``fc2`` (``norm`` slot)."""

    host_class = GluMlp
    dimension = "neurons"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _norm_reason(host)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [_hidden_slot(host)]


class GatedSwiGLU(GatedLayer, SwiGLU):
    """timm ``SwiGLU`` with a ``neurons`` gate on ``act(fc1_g(x)) * fc1_x(x)``, before ``fc2`` (``norm`` slot)."""

    host_class = SwiGLU
    dimension = "neurons"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _norm_reason(host)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [_hidden_slot(host)]

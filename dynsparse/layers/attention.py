"""Gated timm attention: a ``heads`` gate on each head's output, before ``proj``."""

from __future__ import annotations

from timm.layers import Attention
from torch import nn

from .base import GatedLayer, SlotSpec

__all__ = ["GatedAttention"]


class GatedAttention(GatedLayer, Attention):
    """timm ``Attention`` with a ``heads`` gate in its ``norm`` slot: ``(B, N, H * head_dim)`` before ``proj``.

    Works with ``qk_norm``, fused and unfused attention, ``attn_head_dim`` and the output ``gated`` option
    (its per-channel gate follows the head gate, so removing a head stays exact). ``scale_norm=True``
    normalises over all heads and is refused.

    Example:
        >>> import torch, timm.layers
        >>> host = timm.layers.Attention(32, num_heads=4, qk_norm=True)
        >>> gated = GatedAttention.from_module(host).eval()
        >>> x = torch.randn(2, 7, 32)
        >>> torch.allclose(gated(x), host(x))
        True
    """

    host_class = Attention
    dimension = "heads"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if not isinstance(host.norm, nn.Identity):
            return "scale_norm normalises over all heads, so removing a head is not exact"
        return None

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("norm", host.num_heads, dim=-1, unit_size=host.head_dim, scope=("",))]

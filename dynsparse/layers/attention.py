"""Gated timm attention: a ``heads`` gate on each head's output, before ``proj``."""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import Tensor, nn

from ..convert.surgery import slice_linear_in_, slice_linear_out_
from .base import GatedLayer, Producer, SlotSpec, unit_rows

__all__ = ["GatedAttention"]


def head_elements(heads: Tensor, head_dim: int) -> Tensor:
    """Element indices ``(h * head_dim + j)`` of the given heads, in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


class GatedAttention(GatedLayer, Attention):
    """timm ``Attention`` with a ``heads`` gate in its ``norm`` slot: ``(B, N, H * head_dim)`` before ``proj``.

    Works with ``qk_norm``, fused and unfused attention, ``attn_head_dim`` and the output ``gated`` option
    (its per-channel gate follows the head gate, so removing a head stays exact). ``scale_norm=True``
    normalises over all heads and is refused.

    Examples:
        >>> import torch, timm.layers
        >>> host = timm.layers.Attention(32, num_heads=4)
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

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        w = module.attn_dim
        idx = unit_rows(module.num_heads, module.head_dim, offsets=(0, w, 2 * w))
        out = [Producer("qkv.weight", 0, idx)]
        if module.qkv.bias is not None:
            out.append(Producer("qkv.bias", 0, idx))
        return out

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        hd, width = module.head_dim, module.attn_dim
        elems = head_elements(idx, hd)
        slice_linear_out_(module.qkv, torch.cat([elems, elems + width, elems + 2 * width]))
        if module.gate is not None:  # timm's optional sigmoid output gate, one value per channel
            slice_linear_out_(module.gate, elems)
        slice_linear_in_(module.proj, elems, None if scale is None else scale.repeat_interleave(hd))
        module.num_heads = len(idx)
        module.attn_dim = len(idx) * hd

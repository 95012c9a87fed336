"""Gated Hugging Face attention: a ``heads`` gate on the input of the output projection.

The gate multiplies each head's output before ``o_proj`` (``c_proj`` for GPT-2, ``output.dense`` for BERT).
Grouped-query attention (Llama, Qwen2, Mistral) gets one gate unit per key/value group: a unit covers the
``num_key_value_groups`` query heads that read the group, so removing a unit removes a key/value head and its
query heads together and the layer stays valid. Conversion slices q/k/v and the output projection and sets the
attributes the host's ``forward`` reads (``num_heads`` / ``num_attention_heads``, ``split_size``, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.roberta.modeling_roberta import RobertaAttention
from transformers.models.vit.modeling_vit import ViTAttention

from ..convert.zero import ZeroBranch
from .base import Producer, SlotSpec, unit_rows
from .hf_base import IN, HFGatedLayer, head_elements, in_features, out_features, out_producers, slice_in_, slice_out_

__all__ = [
    "GatedBertAttention",
    "GatedGPT2Attention",
    "GatedLlamaAttention",
    "GatedMistralAttention",
    "GatedQwen2Attention",
    "GatedRobertaAttention",
    "GatedViTAttention",
]


class _SplitHeads(HFGatedLayer):
    """Attention with separate q / k / v projections and an output projection; optional grouped-query heads.

    Class attributes name the children (paths): ``_q``, ``_k``, ``_v`` and the output projection ``_consumer``.
    """

    dimension = "heads"
    _q = "q_proj"
    _k = "k_proj"
    _v = "v_proj"
    _consumer = "o_proj"

    @classmethod
    def head_dim(cls, m: nn.Module) -> int:
        return int(m.head_dim)

    @classmethod
    def group_size(cls, m: nn.Module) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return int(getattr(m, "num_key_value_groups", 1))

    @classmethod
    def _units(cls, m: nn.Module) -> int:
        return out_features(m.get_submodule(cls._k)) // cls.head_dim(m)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        unit = cls.group_size(host) * cls.head_dim(host)
        return [SlotSpec(f"{cls._consumer}.{IN}", cls._units(host), dim=-1, unit_size=unit)]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        n, hd, rep = cls._units(module), cls.head_dim(module), cls.group_size(module)
        q = unit_rows(n, rep * hd)
        kv = unit_rows(n, hd)
        return out_producers(module, cls._q, q) + out_producers(module, cls._k, kv) + out_producers(module, cls._v, kv)

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        hd, rep = cls.head_dim(module), cls.group_size(module)
        q_heads = (idx[:, None] * rep + torch.arange(rep, device=idx.device)).flatten()
        q_el, kv_el = head_elements(q_heads, hd), head_elements(idx, hd)
        slice_out_(module.get_submodule(cls._q), q_el)
        slice_out_(module.get_submodule(cls._k), kv_el)
        slice_out_(module.get_submodule(cls._v), kv_el)
        scale = None if scale is None else scale.repeat_interleave(rep * hd)
        slice_in_(module.get_submodule(cls._consumer), q_el, scale)
        cls._set_heads(module, len(q_heads))

    @classmethod
    def _set_heads(cls, module: nn.Module, n: int) -> None:
        """Update the head-count attributes the host reads (GQA hosts read none at run time)."""

    @classmethod
    def num_heads(cls, module: nn.Module) -> int:
        """Query heads of a (converted) host module."""
        return in_features(module.get_submodule(cls._consumer)) // cls.head_dim(module)


class _BertHeads(_SplitHeads):
    _q, _k, _v, _consumer = "self.query", "self.key", "self.value", "output.dense"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if isinstance(host.get_submodule(cls._consumer), ZeroBranch):  # the post-norm stays, the rest is gone
            return "its attention branch was removed by a conversion"
        return None

    @classmethod
    def head_dim(cls, m: nn.Module) -> int:
        return int(m.self.attention_head_size)

    @classmethod
    def group_size(cls, m: nn.Module) -> int:
        return 1

    @classmethod
    def _set_heads(cls, module: nn.Module, n: int) -> None:
        module.self.num_attention_heads = n
        module.self.all_head_size = n * cls.head_dim(module)


class GatedBertAttention(_BertHeads, BertAttention):
    """``BertAttention`` (self- or cross-attention) with a ``heads`` gate before ``output.dense``.

    Examples:
        >>> from transformers import BertConfig
        >>> cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
        >>> gated = GatedBertAttention.from_module(BertAttention(cfg), gate="fixed")
        >>> [child for child, _ in gated.gate_slots()]
        ['output.dense.gate_in']
    """

    host_class = BertAttention


class GatedRobertaAttention(_BertHeads, RobertaAttention):
    """``RobertaAttention`` with a ``heads`` gate before ``output.dense``."""

    host_class = RobertaAttention


class GatedViTAttention(_SplitHeads, ViTAttention):
    """Hugging Face ``ViTAttention`` with a ``heads`` gate before ``o_proj``."""

    host_class = ViTAttention

    @classmethod
    def group_size(cls, m: nn.Module) -> int:
        return 1

    @classmethod
    def _set_heads(cls, module: nn.Module, n: int) -> None:
        module.num_attention_heads = n


class _GQAHeads(_SplitHeads):
    """Llama-style attention: one gate unit per key/value group (``num_key_value_groups`` query heads)."""


class GatedLlamaAttention(_GQAHeads, LlamaAttention):
    """``LlamaAttention`` with one ``heads`` gate unit per key/value group, before ``o_proj``.

    Examples:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
        >>> gated = GatedLlamaAttention.from_module(LlamaAttention(cfg, layer_idx=0), gate="fixed")
        >>> [(c, s.gate.num_units, s.unit_size) for c, s in gated.gate_slots()]
        [('o_proj.gate_in', 2, 16)]
    """

    host_class = LlamaAttention


class GatedQwen2Attention(_GQAHeads, Qwen2Attention):
    """``Qwen2Attention`` with one ``heads`` gate unit per key/value group, before ``o_proj``."""

    host_class = Qwen2Attention


class GatedMistralAttention(_GQAHeads, MistralAttention):
    """``MistralAttention`` with one ``heads`` gate unit per key/value group, before ``o_proj``."""

    host_class = MistralAttention


class GatedGPT2Attention(HFGatedLayer, GPT2Attention):
    """``GPT2Attention`` with a ``heads`` gate before ``c_proj`` (GPT-2's ``Conv1D``, weight ``(in, out)``).

    ``c_attn`` holds q, k and v side by side (``split_size`` columns each); conversion keeps the same heads in
    each of the three and sets ``num_heads`` and ``split_size``. Cross-attention is refused.
    """

    host_class = GPT2Attention
    dimension = "heads"
    _consumer = "c_proj"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if host.is_cross_attention:
            return "GPT-2 cross-attention (q_attn) is not supported"
        return None

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec(f"c_proj.{IN}", host.split_size // host.head_dim, dim=-1, unit_size=host.head_dim)]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        w = module.split_size
        idx = unit_rows(w // module.head_dim, module.head_dim, offsets=(0, w, 2 * w))
        return out_producers(module, "c_attn", idx)

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        hd, w = module.head_dim, module.split_size
        el = head_elements(idx, hd)
        slice_out_(module.c_attn, torch.cat([el, el + w, el + 2 * w]))
        slice_in_(module.c_proj, el, None if scale is None else scale.repeat_interleave(hd))
        module.num_heads = len(idx)
        module.split_size = len(idx) * hd

    @classmethod
    def num_heads(cls, module: nn.Module) -> int:
        return module.split_size // module.head_dim

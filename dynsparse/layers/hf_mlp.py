"""Gated Hugging Face MLPs: a ``neurons`` gate on the hidden units, on the input of the down projection.

The hidden activation of a BERT / RoBERTa layer is split over two children (``intermediate`` makes it, ``output``
reads it), so their gated layer is the whole ``BertLayer``; ViT, GPT-2 and Llama-style models have one MLP module.
A SwiGLU MLP (``act(gate_proj(x)) * up_proj(x)``) keeps the same units of ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.roberta.modeling_roberta import RobertaLayer
from transformers.models.vit.modeling_vit import ViTMLP

from ..convert.zero import ZeroBranch
from .base import Producer, SlotSpec, unit_rows
from .hf_base import IN, HFGatedLayer, in_features, out_producers, slice_in_, slice_out_

__all__ = [
    "GatedBertLayer",
    "GatedGPT2MLP",
    "GatedLlamaMLP",
    "GatedMistralMLP",
    "GatedQwen2MLP",
    "GatedRobertaLayer",
    "GatedViTMLP",
]


class _Hidden(HFGatedLayer):
    """An MLP whose hidden units are made by ``_producers`` (paths) and read by ``_consumer`` (path).

    ``_size_attr`` names an attribute of the layer holding the hidden size, kept in step on conversion.
    """

    dimension = "neurons"
    _producers: tuple[str, ...] = ()
    _consumer = ""
    _size_attr: str | None = None

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if isinstance(host.get_submodule(cls._consumer), ZeroBranch):  # a BERT layer keeps its output LayerNorm
            return "its feed-forward branch was removed by a conversion"
        return None

    @classmethod
    def hidden_size(cls, m: nn.Module) -> int:
        return in_features(m.get_submodule(cls._consumer))

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        # the FLOPs that scale with the kept units: the producers and the consumer, not the whole owner (a BERT
        # layer owns its feed-forward units, but its attention does not shrink with them)
        scope = (*cls._producers, cls._consumer)
        return [SlotSpec(f"{cls._consumer}.{IN}", cls.hidden_size(host), dim=-1, scope=scope)]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        idx = unit_rows(cls.hidden_size(module))
        return [p for path in cls._producers for p in out_producers(module, path, idx)]

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        for path in cls._producers:
            slice_out_(module.get_submodule(path), idx)
        slice_in_(module.get_submodule(cls._consumer), idx, scale)
        if cls._size_attr is not None:
            setattr(module, cls._size_attr, len(idx))


class GatedBertLayer(_Hidden, BertLayer):
    """``BertLayer`` with a ``neurons`` gate on its feed-forward hidden units, before ``output.dense``.

    Examples:
        >>> from transformers import BertConfig
        >>> cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
        >>> gated = GatedBertLayer.from_module(BertLayer(cfg), gate="fixed")
        >>> [(c, s.gate.num_units) for c, s in gated.gate_slots()]
        [('output.dense.gate_in', 64)]
    """

    host_class = BertLayer
    _producers = ("intermediate.dense",)
    _consumer = "output.dense"


class GatedRobertaLayer(_Hidden, RobertaLayer):
    """``RobertaLayer`` with a ``neurons`` gate on its feed-forward hidden units, before ``output.dense``."""

    host_class = RobertaLayer
    _producers = ("intermediate.dense",)
    _consumer = "output.dense"


class GatedViTMLP(_Hidden, ViTMLP):
    """Hugging Face ``ViTMLP`` with a ``neurons`` gate before ``fc2``."""

    host_class = ViTMLP
    _producers = ("fc1",)
    _consumer = "fc2"


class GatedGPT2MLP(_Hidden, GPT2MLP):
    """``GPT2MLP`` with a ``neurons`` gate before ``c_proj`` (``Conv1D`` layers, weight ``(in, out)``)."""

    host_class = GPT2MLP
    _producers = ("c_fc",)
    _consumer = "c_proj"


class _SwiGLU(_Hidden):
    _producers = ("gate_proj", "up_proj")
    _consumer = "down_proj"
    _size_attr = "intermediate_size"


class GatedLlamaMLP(_SwiGLU, LlamaMLP):
    """``LlamaMLP`` (SwiGLU) with a ``neurons`` gate before ``down_proj``.

    Examples:
        >>> from transformers import LlamaConfig
        >>> gated = GatedLlamaMLP.from_module(LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64)))
        >>> [(c, s.gate.num_units) for c, s in gated.gate_slots()]
        [('down_proj.gate_in', 64)]
    """

    host_class = LlamaMLP


class GatedQwen2MLP(_SwiGLU, Qwen2MLP):
    """``Qwen2MLP`` (SwiGLU) with a ``neurons`` gate before ``down_proj``."""

    host_class = Qwen2MLP


class GatedMistralMLP(_SwiGLU, MistralMLP):
    """``MistralMLP`` (SwiGLU) with a ``neurons`` gate before ``down_proj``."""

    host_class = MistralMLP

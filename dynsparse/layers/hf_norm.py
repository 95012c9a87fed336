"""Norms of the residual stream under a ``width`` gate: normalize over the kept channels only (CoFi).

A ``width`` gate is one mask over the residual stream of a whole model. Its gated norms compute their statistics
over the kept channels only, multiply them by the gate values and output zeros elsewhere, so every module that
reads the stream sees what the physically narrower model will see (every reader of the stream in a pre-norm
model is a norm; in a post-norm BERT the norm outputs *are* the stream). The gate lives once, in a `GateSlot` at
the model root; each norm holds a plain reference to that slot (not a child), so the state dict has one copy and
``fix_gates_`` on the slot reaches every norm. In training the gate is sampled once per forward of the model
(CoFi's one mask per step), by a forward pre-hook of the model (`dynsparse.integrations.hf_width`) into the slot's
`WidthSample`, which every norm reads; a norm called without it (no forward of the model yet) samples itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from ..modules import adopt
from .slot import GateSlot

__all__ = ["WIDTH_NORMS", "WidthLayerNorm", "WidthRMSNorm", "WidthSample", "gate_norm", "ungate_norm"]

_SLOT = "_width_slot"
#: Attribute of the width `GateSlot` holding its `WidthSample`.
SAMPLE = "_width_sample"


class WidthSample:
    """The width gate's values for the current training forward, shared by every gated norm.

    Kept until the next forward of the model (a recomputation under activation checkpointing reads the same
    sample); copies and pickles start empty: a sample is not state.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __deepcopy__(self, memo: dict) -> WidthSample:
        return WidthSample()

    def __getstate__(self) -> dict:
        return {"value": None}


class _WidthNorm:
    host_class: type[nn.Module]

    def _subset(self, x: Tensor, idx: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(..., C)`` -> ``(..., C)``, zero on the channels the width gate removes."""
        slot: GateSlot = self.__dict__[_SLOT]
        shared = slot.__dict__.get(SAMPLE)
        v = shared.value if shared is not None and slot.training and shared.value is not None else slot.gate()
        v = v.to(x.dtype)
        idx = (v != 0).nonzero().flatten()
        out = x.new_zeros(x.shape)
        if idx.numel() == 0:
            return out
        y = self._subset(x.index_select(-1, idx), idx) * v.index_select(0, idx)
        return out.index_copy(-1, idx, y)


class WidthLayerNorm(_WidthNorm, nn.LayerNorm):
    """``nn.LayerNorm`` over the channels a shared ``width`` gate keeps."""

    host_class = nn.LayerNorm

    def _subset(self, x: Tensor, idx: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.index_select(0, idx)
        b = None if self.bias is None else self.bias.index_select(0, idx)
        return F.layer_norm(x, (idx.numel(),), w, b, self.eps)


class WidthRMSNorm(_WidthNorm):
    """Llama-style RMSNorm (float32 statistics, ``weight * x.to(dtype)``) over the kept channels."""

    def _subset(self, x: Tensor, idx: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight.index_select(0, idx) * h.to(x.dtype)


class WidthLlamaRMSNorm(WidthRMSNorm, LlamaRMSNorm):
    host_class = LlamaRMSNorm


class WidthQwen2RMSNorm(WidthRMSNorm, Qwen2RMSNorm):
    host_class = Qwen2RMSNorm


class WidthMistralRMSNorm(WidthRMSNorm, MistralRMSNorm):
    host_class = MistralRMSNorm


#: host norm class -> its width-gated twin
WIDTH_NORMS: dict[type[nn.Module], type[nn.Module]] = {
    nn.LayerNorm: WidthLayerNorm,
    LlamaRMSNorm: WidthLlamaRMSNorm,
    Qwen2RMSNorm: WidthQwen2RMSNorm,
    MistralRMSNorm: WidthMistralRMSNorm,
}


def gate_norm(norm: nn.Module, slot: GateSlot) -> nn.Module:
    """The width-gated twin of ``norm`` (sharing its parameters), reading the gate of ``slot``."""
    new = adopt(norm, WIDTH_NORMS[type(norm)])
    new.__dict__[_SLOT] = slot
    return new


def ungate_norm(norm: nn.Module) -> nn.Module:
    """The host-class norm of a width-gated norm (sharing its parameters)."""
    if not isinstance(norm, _WidthNorm):
        return norm
    host = norm.host_class.__new__(norm.host_class)
    host.__dict__.update({k: (v.copy() if isinstance(v, (dict, set)) else v) for k, v in norm.__dict__.items()})
    del host.__dict__[_SLOT]
    return host

"""The ``width`` dimension of Hugging Face models: one mask over the residual stream (CoFi).

Coupled across the whole model, so it is a separate table from the per-layer one (`dynsparse.integrations.hf`):
every module class lists the children that *embed* into the stream, *read* it (input features), *write* it
(output features) or *normalize* it. A model whose parameters are not all covered by the table is refused with
the fqn and class of the first uncovered module, so a head the table does not know can never be silently wrong.

Gating puts one `GateSlot` at the model root (``model.width``) and swaps every norm of the stream for its
width-gated twin (`dynsparse.layers.hf_norm`); conversion slices every listed child and folds non-binary gate
values into the norms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertForSequenceClassification,
    BertIntermediate,
    BertOutput,
    BertPooler,
    BertSelfAttention,
    BertSelfOutput,
)
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2LMHeadModel, GPT2Model
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from transformers.models.mistral.modeling_mistral import (
    MistralAttention,
    MistralDecoderLayer,
    MistralForCausalLM,
    MistralMLP,
    MistralModel,
)
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
)
from transformers.models.roberta.modeling_roberta import (
    RobertaClassificationHead,
    RobertaEmbeddings,
    RobertaIntermediate,
    RobertaOutput,
    RobertaPooler,
    RobertaSelfAttention,
    RobertaSelfOutput,
)
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTEmbeddings,
    ViTForImageClassification,
    ViTLayer,
    ViTMLP,
    ViTModel,
    ViTPooler,
)

from ..convert.surgery import slice_conv_out_, slice_param_
from ..errors import UnsupportedModuleError
from ..gates import Gate, GateSpec, make_gate
from ..layers.hf_base import slice_in_, slice_out_
from ..layers.hf_norm import SAMPLE, WIDTH_NORMS, WidthSample, gate_norm, ungate_norm
from ..layers.slot import GateSlot
from ..modules import first_param, join_fqn, submodule_or_none

__all__ = [
    "KERNELS",
    "ROLES",
    "SLOT",
    "check_covered",
    "gate_width_",
    "keep_of",
    "kernels_of",
    "sample_width",
    "slice_width_",
    "width_of",
]

#: Name of the root child holding the width gate.
SLOT = "width"

_LLAMA_LIKE = {
    "model": (LlamaModel, Qwen2Model, MistralModel),
    "layer": (LlamaDecoderLayer, Qwen2DecoderLayer, MistralDecoderLayer),
    "attn": (LlamaAttention, Qwen2Attention, MistralAttention),
    "mlp": (LlamaMLP, Qwen2MLP, MistralMLP),
    "lm": (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM),
}

ROLES_BERT_EMBEDDINGS = {
    "embed": ("word_embeddings", "position_embeddings", "token_type_embeddings"),
    "norm": ("LayerNorm",),
}

#: host class -> role -> children (module paths; ``params`` names parameters whose last axis is the stream).
#: Roles: ``embed`` (Embedding columns), ``params``, ``patch`` (Conv2d output channels), ``read`` (input features),
#: ``write`` (output features), ``norm``, ``off`` (parameters off the stream, e.g. a classifier on a pooler).
ROLES: dict[type[nn.Module], dict[str, tuple[str, ...]]] = {
    **{c: {"embed": ("embed_tokens",), "norm": ("norm",)} for c in _LLAMA_LIKE["model"]},
    **{c: {"norm": ("input_layernorm", "post_attention_layernorm")} for c in _LLAMA_LIKE["layer"]},
    **{c: {"read": ("q_proj", "k_proj", "v_proj"), "write": ("o_proj",)} for c in _LLAMA_LIKE["attn"]},
    **{c: {"read": ("gate_proj", "up_proj"), "write": ("down_proj",)} for c in _LLAMA_LIKE["mlp"]},
    **{c: {"read": ("lm_head",)} for c in _LLAMA_LIKE["lm"]},
    GPT2Model: {"embed": ("wte", "wpe"), "norm": ("ln_f",)},
    GPT2Block: {"norm": ("ln_1", "ln_2")},
    GPT2Attention: {"read": ("c_attn",), "write": ("c_proj",)},
    GPT2MLP: {"read": ("c_fc",), "write": ("c_proj",)},
    GPT2LMHeadModel: {"read": ("lm_head",)},
    BertEmbeddings: ROLES_BERT_EMBEDDINGS,
    BertSelfAttention: {"read": ("query", "key", "value")},
    BertSelfOutput: {"write": ("dense",), "norm": ("LayerNorm",)},
    BertIntermediate: {"read": ("dense",)},
    BertOutput: {"write": ("dense",), "norm": ("LayerNorm",)},
    BertPooler: {"read": ("dense",)},
    BertForSequenceClassification: {"off": ("classifier",)},
    RobertaEmbeddings: ROLES_BERT_EMBEDDINGS,
    RobertaSelfAttention: {"read": ("query", "key", "value")},
    RobertaSelfOutput: {"write": ("dense",), "norm": ("LayerNorm",)},
    RobertaIntermediate: {"read": ("dense",)},
    RobertaOutput: {"write": ("dense",), "norm": ("LayerNorm",)},
    RobertaPooler: {"read": ("dense",)},
    RobertaClassificationHead: {"read": ("dense",), "off": ("out_proj",)},
    ViTEmbeddings: {
        "params": ("cls_token", "mask_token", "position_embeddings"),
        "patch": ("patch_embeddings.projection",),
    },
    ViTAttention: {"read": ("q_proj", "k_proj", "v_proj"), "write": ("o_proj",)},
    ViTMLP: {"read": ("fc1",), "write": ("fc2",)},
    ViTLayer: {"norm": ("layernorm_before", "layernorm_after")},
    ViTModel: {"norm": ("layernorm",)},
    ViTPooler: {"read": ("dense",)},
    ViTForImageClassification: {"read": ("classifier",)},
}

#: Host classes whose own FLOPs are the attention kernel (q·k and attention·v; their projections are children). The
#: kernel runs over the heads' channels, which a narrower stream leaves as they are, so the width gate does not
#: scale it (`dynsparse.flops.CostModel`); the heads and attention-branch gates do.
KERNELS: tuple[type[nn.Module], ...] = (
    BertSelfAttention,
    RobertaSelfAttention,
    GPT2Attention,
    ViTAttention,
    *_LLAMA_LIKE["attn"],
)


def _host(m: nn.Module) -> type[nn.Module]:
    return getattr(type(m), "host_class", type(m))


def _roles(model: nn.Module) -> list[tuple[str, str, str, nn.Module]]:
    """``(owner_fqn, role, child, owner)`` for every listed child present in ``model``."""
    out = []
    for fqn, m in model.named_modules():
        for role, children in ROLES.get(_host(m), {}).items():
            for child in children:
                target = getattr(m, child, None) if role == "params" else submodule_or_none(m, child)
                if target is not None:
                    out.append((fqn, role, child, m))
    return out


def check_covered(model: nn.Module, roles: list[tuple[str, str, str, nn.Module]] | None = None) -> None:
    """Raise `UnsupportedModuleError` for the first module with parameters that `ROLES` does not cover."""
    roles = _roles(model) if roles is None else roles
    covered = {join_fqn(fqn, child) for fqn, _, child, _ in roles}
    covered |= {fqn for fqn, m in model.named_modules() if isinstance(m, (Gate, GateSlot))}  # dynsparse's own gates
    for fqn, m in model.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)]
        if not own:
            continue
        names = {join_fqn(fqn, n) for n in own}
        if any(fqn == c or fqn.startswith(c + ".") for c in covered) or names <= covered:
            continue
        raise UnsupportedModuleError(
            fqn, type(m).__name__, "width", "no rule says how it reads or writes the residual stream"
        )


def kernels_of(model: nn.Module) -> list[str]:
    """Fqns of the modules of ``model`` whose own FLOPs are an attention kernel (`KERNELS`, gated or not)."""
    return [fqn for fqn, m in model.named_modules() if _host(m) in KERNELS]


def width_of(model: nn.Module) -> int | None:
    """Width of the residual stream of a model the table covers (from its norms), or None."""
    for _, role, child, m in _roles(model):
        if role == "norm":
            return int(m.get_submodule(child).weight.shape[0])
    return None


def gate_width_(model: nn.Module, gate: GateSpec) -> nn.Module:
    """Put one ``width`` gate over the residual stream of ``model`` (in place): a slot at ``model.width`` and
    width-gated twins of every norm of the stream.

    Raises:
        UnsupportedModuleError: a parameter of the model is not covered by `ROLES`, a norm is of an unknown
            class, or the model already has a ``width`` child.
    """
    roles = _roles(model)
    # a converted model's removed branch has an nn.Identity for its norm: it reads nothing of the stream
    norms = [
        (fqn, child, m)
        for fqn, role, child, m in roles
        if role == "norm" and not isinstance(m.get_submodule(child), nn.Identity)
    ]
    if not norms:
        raise UnsupportedModuleError("", type(model).__name__, "width", "no norm of a known residual stream")
    if SLOT in model._modules or hasattr(model, SLOT):
        raise UnsupportedModuleError("", type(model).__name__, "width", f"it already has a {SLOT!r} attribute")
    check_covered(model, roles)
    width = width_of(model)
    for fqn, child, m in norms:
        norm = m.get_submodule(child)
        if type(norm) not in WIDTH_NORMS or tuple(norm.weight.shape) != (width,):
            raise UnsupportedModuleError(
                join_fqn(fqn, child), type(norm).__name__, "width", f"not a known norm over the {width} stream channels"
            )
    ref = first_param(model)
    g = make_gate(gate, width, device=ref.device, dtype=ref.dtype)
    slot = GateSlot(g, dimension="width", dim=-1, unit_size=1, scope=("",)).train(model.training)
    slot.__dict__[SAMPLE] = WidthSample()
    setattr(model, SLOT, slot)
    for _, child, m in norms:
        setattr(m, child, gate_norm(m.get_submodule(child), slot))
    model.register_forward_pre_hook(sample_width)
    return model


def sample_width(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a width-gated model: in training, one sample of the width gate per forward, which
    every gated norm reads (CoFi's one stream mask; sampled in each norm, the layers would see different masks)."""
    slot = model._modules.get(SLOT)
    if isinstance(slot, GateSlot) and isinstance(slot.__dict__.get(SAMPLE), WidthSample):
        slot.__dict__[SAMPLE].value = slot.gate() if slot.training else None


def slice_width_(model: nn.Module, idx: Tensor, scale: Tensor | None = None) -> nn.Module:
    """Keep stream channels ``idx`` everywhere in ``model`` (in place); ``scale`` is folded into the norms.

    Also swaps width-gated norms back to their host class and removes the root slot. Tied input / output
    embeddings stay tied.
    """
    lm_head, embed = getattr(model, "lm_head", None), None
    if lm_head is not None and hasattr(model, "get_input_embeddings"):
        embed = model.get_input_embeddings()
    tied = lm_head is not None and embed is not None and lm_head.weight is embed.weight
    for _, role, child, m in _roles(model):
        if role == "params":
            slice_param_(m, child, idx.to(getattr(m, child).device), dim=-1 % getattr(m, child).ndim)
            continue
        target = m.get_submodule(child)
        if getattr(target, "weight", None) is None:  # a removed branch (ZeroBranch) or a weightless module
            continue
        if role == "embed":
            slice_param_(target, "weight", idx, 1)
            target.embedding_dim = len(idx)
        elif role == "patch":
            slice_conv_out_(target, idx)
        elif role == "read":
            slice_in_(target, idx)
        elif role == "write":
            slice_out_(target, idx)
        elif role == "norm":
            norm = ungate_norm(target)
            for name in ("weight", "bias"):
                if getattr(norm, name, None) is not None:
                    slice_param_(norm, name, idx, 0, scale)
            if isinstance(norm, nn.LayerNorm):
                norm.normalized_shape = (len(idx),)
            setattr(m, child, norm)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    for m in model.modules():
        if isinstance(getattr(m, "hidden_size", None), int) and not isinstance(m, nn.Embedding):
            m.hidden_size = len(idx)
    if SLOT in model._modules:
        del model._modules[SLOT]
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is sample_width]:
        del model._forward_pre_hooks[key]
    return model


def keep_of(slot: GateSlot) -> tuple[Tensor, Tensor]:
    """Keep indices and values of the width gate (keep-none keeps channel 0 with value 0)."""
    with torch.no_grad():
        values = slot.gate.eval_values().detach()
        idx = slot.gate.keep_mask().nonzero().flatten()
    if idx.numel() == 0:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=values.dtype)
    return idx, values[idx]

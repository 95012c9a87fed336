"""Hugging Face decoders with removed attention branches: every attention branch closed, and mixed sliding-window /
full-attention models. Padded batches, greedy generation with the KV cache, a hand-written cached decoding loop,
and `ds.save` / `ds.load` must all give what the gated model gives."""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.errors import UnsupportedModuleError  # noqa: E402
from dynsparse.integrations.hf import _CACHED_ATTENTION, ZeroAttention  # noqa: E402

torch.set_num_threads(1)

SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_hidden_layers=4)
# no end-of-sequence token: every generation runs max_new_tokens steps, like the hand-written loops
DECODER = dict(vocab_size=61, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _gpt2():
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=4, n_layer=4, n_inner=48, n_positions=64, **DECODER)
    )
    with torch.no_grad():  # position embeddings large enough that a wrong position changes the greedy tokens
        model.transformer.wpe.weight.normal_(0.0, 1.0)
    return model


def _qwen2(**kw):
    cfg = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, **kw, **SMALL, **DECODER)
    return transformers.Qwen2ForCausalLM(cfg)


FACTORIES = {
    "gpt2": _gpt2,
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, **DECODER)),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(sliding_window=4, **SMALL, **DECODER)
    ),
    "qwen2-window-layers": lambda: _qwen2(max_window_layers=1),  # full, sliding, sliding, sliding
    "qwen2-layer-types": lambda: _qwen2(layer_types=ALTERNATING),
}
MIXED = ["qwen2-window-layers", "qwen2-layer-types"]


def _build(name, seed=0):
    torch.manual_seed(seed)
    return FACTORIES[name]().eval()


def _attention_slots(model):
    """The one-unit ``layers`` gate of each layer's attention branch, in layer order."""
    return [f for f, g in ds.named_gates(model) if g.num_units == 1 and ("attn" in f and "mlp" not in f)]


def _gated(name, closed_attention=(), seed=0, dims=("layers",)):
    """A gated model: random masks for ``dims`` (MLP branches stay), the attention of ``closed_attention`` closed."""
    model = _build(name, seed)
    ds.sparsify_(model, {d: "fixed" for d in dims})
    g = torch.Generator().manual_seed(seed + 1)
    masks = {f: torch.rand(gt.num_units, generator=g) < 0.6 for f, gt in ds.named_gates(model) if gt.num_units > 1}
    masks.update({f: torch.tensor([True]) for f, gt in ds.named_gates(model) if gt.num_units == 1})
    for i, f in enumerate(_attention_slots(model)):
        masks[f] = torch.tensor([i not in closed_attention])
    return ds.fix_gates_(model, masks)


def _padded(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as for generation
    ids[mask == 0] = 0
    return ids, mask


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{msg}: {m}")


def _greedy(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)


def _cached_loop(model, ids, steps=8):
    """Greedy decoding by hand: a forward with the cache, no position ids (they come from the cache's length)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            out = model(tokens[-1], cache=out.cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    assert out.cache.get_seq_length() == ids.shape[1] + steps - 1
    return torch.cat(tokens, 1), out.logits


def _no_cache_loop(model, ids, steps=8):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _check(model, converted, tmp_path, name):
    """Converted = gated: logits on a padded batch, greedy generation, a cached loop; and after ds.save / ds.load."""
    ids, mask = _padded()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        _close(converted(ids, attention_mask=mask).logits, ref, name)
    tokens = _greedy(model, ids, mask)
    assert torch.equal(_greedy(converted, ids, mask), tokens), name
    plain = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    want, want_logits = _cached_loop(model, plain)
    got, got_logits = _cached_loop(converted, plain)
    assert torch.equal(got, want), name
    _close(got_logits, want_logits, f"{name}, last step of the cached loop")
    loaded = ds.load(ds.save(converted, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, converted(ids, attention_mask=mask).logits)
    assert torch.equal(_greedy(loaded, ids, mask), tokens), f"{name} after ds.load"
    assert loaded.config.to_dict() == converted.config.to_dict()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_attention_branch_removed(name, tmp_path):
    model = _gated(name, closed_attention=range(4), dims=("neurons", "layers"))
    converted = ds.convert(model)
    assert not any(isinstance(m, _CACHED_ATTENTION) for m in converted.modules())
    counters = [m for m in converted.modules() if isinstance(m, ZeroAttention) and m.counts_tokens]
    assert len(counters) == 1 and counters[0].layer_idx == 0, "one removed layer counts the tokens in entry 0"
    assert converted.config.to_dict() == model.config.to_dict(), "nothing to rewrite when no attention is left"
    _check(model, converted, tmp_path, name)
    ids, _ = _padded()
    unpadded = ids[[0, 2]]
    assert torch.equal(_no_cache_loop(converted, unpadded), _greedy(converted, unpadded, torch.ones_like(unpadded)))


def test_every_layer_removed_still_counts_tokens(tmp_path):
    model = _gated("gpt2", closed_attention=range(4))
    ds.fix_gates_(model, {f: torch.tensor([False]) for f, g in ds.named_gates(model)})
    converted = ds.convert(model)
    assert [type(b.attn).__name__ for b in converted.transformer.h] == ["ZeroAttention"] * 4
    assert [type(b).__name__ for b in converted.transformer.h] == ["GPT2Block"] * 4, "blocks keep their class"
    assert converted.transformer.h[0].attn.counts_tokens
    _check(model, converted, tmp_path, "gpt2 without layers")


@pytest.mark.parametrize("name", MIXED)
@pytest.mark.parametrize("closed", [c for c in itertools.product((0, 1), repeat=4) if 0 < sum(c) < 4])
def test_mixed_sliding_and_full_attention(name, closed, tmp_path):
    closed_attention = {i for i, c in enumerate(closed) if c}
    model = _gated(name, closed_attention, dims=("heads", "neurons", "layers"))
    types = list(model.config.layer_types)
    assert len(set(types)) == 2
    converted = ds.convert(model)
    live = [i for i in range(4) if i not in closed_attention]
    # the remaining layers keep their own entries and types; the first one takes entry 0, whose type it gets
    attn = [m for m in converted.modules() if isinstance(m, _CACHED_ATTENTION)]
    assert [m.layer_idx for m in attn] == [0, *live[1:]]
    new = converted.config.layer_types
    assert [new[i] for i in live] == [types[i] for i in live]
    assert all(new[i] == types[live[0]] for i in closed_attention)
    assert model.config.layer_types == types, "convert changed its input's config"
    _check(model, converted, tmp_path, f"{name} {closed}")


def test_removed_whole_layers_in_a_mixed_model(tmp_path):
    model = _gated("qwen2-layer-types", closed_attention={0, 3}, dims=("heads", "neurons", "layers"))
    ds.fix_gates_(model, {"model.layers.0.mlp.down_proj.gate_out.gate": torch.tensor([False])})
    converted = ds.convert(model)
    assert isinstance(converted.model.layers[0].self_attn, ZeroAttention)
    assert isinstance(converted.model.layers[0].mlp, ds.ZeroBranch)
    assert [m.layer_idx for m in converted.modules() if isinstance(m, _CACHED_ATTENTION)] == [0, 2]
    assert converted.config.layer_types == ["full_attention", *ALTERNATING[1:3], "full_attention"]
    _check(model, converted, tmp_path, "qwen2 without layer 0")


def test_random_masks_in_every_dimension(tmp_path):
    for name, seed in itertools.product(list(FACTORIES), (1, 2)):
        model = _build(name, seed)
        ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
        g = torch.Generator().manual_seed(seed)
        ds.fix_gates_(model, {f: torch.rand(gt.num_units, generator=g) < 0.6 for f, gt in ds.named_gates(model)})
        _check(model, ds.convert(model), tmp_path, f"{name} seed {seed}")


def test_layer_types_of_another_length_are_refused():
    model = _gated("qwen2-layer-types", closed_attention={0})
    model.config.layer_types = [*ALTERNATING, "full_attention"]  # one item more than the model has layers
    with pytest.raises(UnsupportedModuleError, match="layer_types has 5 items for 4 attention layers"):
        ds.convert(model)


def test_gpt2_cross_attention_stays_when_both_gated_branches_close():
    """A GPT-2 block with cross-attention keeps its (ungated) cross-attention branch when self-attention and MLP close:
    it is edited in place (as every block is); full and cached forwards equal the gated model's."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_head=4, n_layer=2, n_inner=48, n_positions=64, add_cross_attention=True, **DECODER
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ds.sparsify_(model, {"layers": "fixed"})
    ds.fix_gates_(model, {f: torch.tensor([not f.startswith("transformer.h.0.")]) for f, _ in ds.named_gates(model)})
    converted = ds.convert(model)
    assert isinstance(converted.transformer.h[0].attn, ZeroAttention)
    assert converted.transformer.h[0].crossattention is not None
    ids, mask = _padded()
    enc = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))

    def run(m):
        first = m(ids, attention_mask=mask, encoder_hidden_states=enc, use_cache=True)
        nxt = first.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        second = m(nxt, attention_mask=mask2, encoder_hidden_states=enc, cache=first.cache, use_cache=True)
        return first.logits, second.logits

    with torch.no_grad():
        for got, want in zip(run(converted), run(model), strict=True):
            _close(got, want, "gpt2 with cross-attention")

"""Hugging Face integration, second review: regressions found by exercising tiny random-weight models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402

torch.set_num_threads(1)

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=3)
DECODER = dict(vocab_size=61, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)

FACTORIES = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(vocab_size=61, max_position_embeddings=40, **SMALL)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_head=4, n_layer=3, n_inner=48, n_positions=64, **DECODER)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **SMALL, **DECODER)),
}
# the one-unit gates of each layer's two residual branches, (attention, MLP)
BRANCH_GATES = {
    "bert": ("encoder.layer.{}.attention.output.dense.gate_out.gate", "encoder.layer.{}.output.dense.gate_out.gate"),
    "gpt2": ("transformer.h.{}.attn.c_proj.gate_out.gate", "transformer.h.{}.mlp.c_proj.gate_out.gate"),
    "llama": ("model.layers.{}.self_attn.o_proj.gate_out.gate", "model.layers.{}.mlp.down_proj.gate_out.gate"),
}


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    if name == "bert":
        mask[1, 5:] = 0
    else:
        mask[1, :4] = 0  # left padding, as for generation
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _pruned(model, seed, closed=(), **kw):
    """Gate heads, neurons and layers with random masks; the branch gates in ``closed`` are closed."""
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"}, **kw)
    g = torch.Generator().manual_seed(seed)
    masks = {f: torch.rand(gt.num_units, generator=g) < 0.7 for f, gt in ds.named_gates(model) if gt.num_units > 1}
    return ds.fix_gates_(model, masks | {f: torch.tensor([False]) for f in closed})


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_converted_model_with_removed_branches_is_gated_and_converted_again(name, tmp_path):
    torch.manual_seed(0)
    attn, mlp = BRANCH_GATES[name]
    model = _pruned(FACTORIES[name]().eval(), 1, closed=[attn.format(0), mlp.format(1), attn.format(2)])
    small = ds.convert(model)
    # layer 0 keeps its MLP branch, layer 1 its attention branch, layer 2 its MLP branch: one layer gate each
    # BERT keeps the modules of a removed branch (its post-norm stays): they are skipped by name
    _pruned(small, 2, closed=[mlp.format(0)], on_unsupported="skip" if name == "bert" else "raise")
    assert sorted(f for f, g in ds.named_gates(small) if g.num_units == 1 and "gate_out" in f) == sorted(
        [mlp.format(0), attn.format(1), mlp.format(2)]
    )
    smaller = ds.convert(small)
    x = _inputs(name)
    torch.testing.assert_close(_out(smaller, x), _out(small, x), rtol=1e-4, atol=1e-5)
    again = ds.load(ds.save(smaller, tmp_path / "m.safetensors")).eval()
    torch.testing.assert_close(_out(again, x), _out(smaller, x), rtol=0, atol=0)


def test_bert_modules_of_a_removed_branch_are_refused_by_name():
    torch.manual_seed(0)
    attn, mlp = BRANCH_GATES["bert"]
    small = ds.convert(_pruned(FACTORIES["bert"]().eval(), 1, closed=[attn.format(0), mlp.format(1)]))
    with pytest.raises(ds.UnsupportedModuleError, match=r"layer\.0\.attention' .*attention branch was removed"):
        ds.sparsify_(small, {"heads": "fixed"})
    with pytest.raises(ds.UnsupportedModuleError, match=r"'encoder\.layer\.1' .*feed-forward branch was removed"):
        ds.sparsify_(small, {"neurons": "fixed"})


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_width_gate_on_a_converted_pre_norm_model_with_removed_branches(name, tmp_path):
    torch.manual_seed(0)
    attn, mlp = BRANCH_GATES[name]
    small = ds.convert(_pruned(FACTORIES[name]().eval(), 1, closed=[attn.format(0), mlp.format(1)]))
    ds.sparsify_(small, {"width": "fixed"})  # the norms of the removed branches are nn.Identity: nothing to gate
    g = torch.Generator().manual_seed(3)
    ds.fix_gates_(small, {"width.gate": torch.rand(32, generator=g) < 0.7})
    narrow = ds.convert(small)
    x = _inputs(name)
    torch.testing.assert_close(_out(narrow, x), _out(small, x), rtol=1e-4, atol=1e-5)
    again = ds.load(ds.save(narrow, tmp_path / "m.safetensors")).eval()
    torch.testing.assert_close(_out(again, x), _out(narrow, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_converted_model_is_in_eval_mode_throughout(name, tmp_path):
    torch.manual_seed(0)
    attn, mlp = BRANCH_GATES[name]
    model = _pruned(FACTORIES[name](), 1, closed=[attn.format(0), mlp.format(1)])  # gated in training mode
    small = ds.convert(model)
    assert [f for f, m in small.named_modules() if m.training] == []
    again = ds.load(ds.save(small, tmp_path / "m.safetensors"))
    assert [f for f, m in again.named_modules() if m.training] == []

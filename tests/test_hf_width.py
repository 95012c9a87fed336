"""The ``width`` dimension of Hugging Face models: one mask over the residual stream, shared by every norm."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

from test_hf import DECODERS, FACTORIES, _build, _close, _foreign, _inputs, _out, _random_masks  # noqa: E402

import dynsparse as ds  # noqa: E402
from dynsparse.errors import ConfigError, UnsupportedModuleError  # noqa: E402

torch.set_num_threads(1)
ALL = ("width", "heads", "neurons", "layers")


def _stream(gated, out, model):
    """The gated output restricted to the kept stream channels, when the output is the stream itself."""
    return out[..., gated.width.gate.keep_mask()] if out.shape[-1] == gated.width.gate.num_units else out


@pytest.mark.parametrize("name", list(FACTORIES))
def test_width_with_every_dimension_converts_exactly(name, tmp_path):
    model = _build(name)
    x = _inputs(name)
    dense = _out(model, x)
    ds.sparsify_(model, {d: "fixed" for d in ALL})
    _close(_out(model, x), dense, f"{name} open gates")
    ds.fix_gates_(model, _random_masks(model, seed=7))
    kept = int(model.width.gate.keep_mask().sum())
    assert 0 < kept < model.width.gate.num_units
    ref = _out(model, x)
    converted = ds.convert(model)
    out = _out(converted, x)
    _close(out, _stream(model, ref, converted), name)
    assert _foreign(converted) == []
    norms = [m for m in converted.modules() if "Norm" in type(m).__name__]
    assert norms and all(m.weight.shape == (kept,) for m in norms)
    loaded = ds.load(ds.save(converted, tmp_path / "m.safetensors"))
    assert torch.equal(_out(loaded, x), out)


@pytest.mark.parametrize("name", DECODERS)
def test_width_pruned_decoders_generate_the_same_tokens(name):
    model = _build(name)
    ds.sparsify_(model, {"width": "fixed", "heads": "fixed"})
    ds.fix_gates_(model, _random_masks(model, seed=2))
    converted = ds.convert(model)
    x = _inputs(name)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(converted.generate(**x, **kw), model.generate(**x, **kw))
    if name == "gpt2":  # tied input / output embeddings stay tied
        assert converted.lm_head.weight is converted.transformer.wte.weight


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_uniform_width_round_trips_through_save_pretrained(name, tmp_path):
    model = _build(name)
    ds.sparsify_(model, {"width": "fixed", "heads": "fixed", "neurons": "fixed"})
    ds.fix_gates_(model, _random_masks(model, seed=4))
    ds.fix_gates_(model, {"width": torch.arange(32) < 23})  # 23 channels: not a multiple of the head count
    converted = ds.convert(model, uniform=True)
    cfg = converted.config
    assert cfg.hidden_size < 32 and cfg.hidden_size % cfg.num_attention_heads == 0  # rounded by rank
    converted.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    x = _inputs(name)
    assert torch.equal(_out(reloaded, x), _out(converted, x))


def test_non_binary_width_values_fold_into_the_norms():
    model = _build("llama")
    ds.sparsify_(model, {"width": "hard_concrete"})
    with torch.no_grad():
        model.width.gate.log_alpha.normal_(0.0, 2.0)
    ds.fix_gates_(model.eval())
    values = model.width.gate.eval_values()
    assert bool(((values > 0) & (values < 1)).any())
    x = _inputs("llama")
    _close(_out(ds.convert(model), x), _out(model, x), "llama")


def test_width_gate_is_one_module_and_trains():
    model = _build("bert")
    ds.sparsify_(model, {"width": "hard_concrete"})
    assert [f for f, _ in ds.named_gates(model)] == ["width.gate"]
    assert [k for k in model.state_dict() if ".gate." in f".{k}"] == ["width.gate.log_alpha"]
    model.train()
    _out(model, _inputs("bert")).sum().backward()
    assert model.width.gate.log_alpha.grad is not None and torch.isfinite(model.width.gate.log_alpha.grad).all()


def test_width_refusals_name_the_module():
    mlm = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=61, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=1
        )
    )
    with pytest.raises(UnsupportedModuleError, match=r"'cls\.predictions' \(BertLMPredictionHead\)"):
        ds.sparsify_(mlm, {"width": "fixed"})
    assert not list(ds.named_gates(mlm))
    import timm

    with pytest.raises(UnsupportedModuleError, match="residual-stream"):
        ds.sparsify_(timm.create_model("test_vit"), {"width": "fixed"})
    with pytest.raises(ConfigError, match="include/exclude"):
        ds.sparsify_(_build("llama"), {"width": {"gate": "fixed", "include": "model.*"}})
    bert = _build("bert")
    ds.sparsify_(bert, {"width": "fixed"})
    ds.fix_gates_(bert, {"width": torch.arange(32) < 20})
    with pytest.raises(ConfigError, match=r"narrower width needs dynsparse\.save"):
        ds.convert(bert, uniform=True)


def test_gated_checkpoint_with_width_round_trips(tmp_path):
    model = _build("gpt2")
    ds.sparsify_(model, {"width": "fixed", "neurons": "fixed"})
    ds.fix_gates_(model, _random_masks(model, seed=9))
    loaded, _ = ds.load_gated(ds.save_gated(model, tmp_path / "g.safetensors"))
    x = _inputs("gpt2")
    assert torch.equal(_out(loaded.eval(), x), _out(model, x))
    assert torch.equal(loaded.width.gate.keep_mask(), model.width.gate.keep_mask())


def test_convert_verifies_a_width_pruned_model_on_the_kept_channels():
    """``convert(verify_inputs=...)`` compares a narrower output with the gated model's kept channels, and a wrong
    converted model is still caught."""
    from dynsparse.convert.verify import verify

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=61, hidden_size=32, num_attention_heads=4, intermediate_size=48)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ds.sparsify_(model, {"width": "fixed", "heads": "fixed"})
    mask = torch.ones(32, dtype=torch.bool)
    mask[::3] = False
    ds.fix_gates_(model, {"width.gate": mask})
    x = torch.randint(3, 61, (2, 7))
    conv = ds.convert(model, verify_inputs=(x,))  # raised "different structure or shape" before
    assert conv(x)[0].shape[-1] == int(mask.sum())
    w = conv.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        w.add_(0.1 * torch.randn_like(w))
    with pytest.raises(ds.DynsparseError, match="outputs differ"):
        verify(model, conv, (x,), width=(32, conv.slice_plan.keep("width")))


def _norm_masks(model):
    """The zero pattern each width-gated norm outputs in the next forward (recorded by forward hooks)."""
    from dynsparse.layers.hf_norm import WIDTH_NORMS

    seen, handles = [], []
    for m in model.modules():
        if type(m) in WIDTH_NORMS.values():
            handles.append(
                m.register_forward_hook(lambda _m, _a, y: seen.append((y.detach() != 0).flatten(0, -2).any(0)))
            )
    return seen, handles


@pytest.mark.parametrize("name", list(FACTORIES))
def test_width_gate_is_sampled_once_per_training_forward(name):
    """CoFi: one stream mask per step. Sampled in each norm, the layers of one forward saw different masks."""
    model = _build(name)
    ds.sparsify_(model, {"width": {"gate": "hard_concrete", "init_drop_rate": 0.4}})
    model.train()
    seen, handles = _norm_masks(model)
    masks = []
    for step in range(3):
        seen.clear()
        _out(model, _inputs(name, step)).sum().backward()
        assert len(seen) >= 2
        for m in seen[1:]:
            assert torch.equal(m, seen[0]), f"step {step}: the norms of one forward saw different width masks"
        masks.append(seen[0])
    assert not all(torch.equal(m, masks[0]) for m in masks[1:])  # but a new sample every forward
    for h in handles:
        h.remove()
    model.eval()  # eval: the deterministic gate, no sample kept
    _out(model, _inputs(name))
    assert model.width.__dict__["_width_sample"].value is None


def test_width_sample_under_activation_checkpointing_and_copies():
    import copy

    model = _build("llama")
    ds.sparsify_(model, {"width": {"gate": "hard_concrete", "init_drop_rate": 0.4}})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(5)
    ref = copy.deepcopy(model)  # a copy of a gated model in training holds no sample (not state)
    assert ref.width.__dict__["_width_sample"].value is None
    ref.gradient_checkpointing_disable()
    torch.manual_seed(1)
    _out(model, _inputs("llama")).sum().backward()
    torch.manual_seed(1)
    _out(ref, _inputs("llama")).sum().backward()
    # the recomputation in backward reads the forward's sample: the same gradients as without checkpointing
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    copy.deepcopy(model)  # a sample with autograd history does not break copies (convert copies the model)


def test_convert_removes_the_width_sampling_hook():
    from dynsparse.integrations.hf_width import sample_width

    model = _build("bert")
    ds.sparsify_(model, {"width": "hard_concrete"})
    assert sample_width in model._forward_pre_hooks.values()
    small = ds.convert(model.eval())
    assert sample_width not in small._forward_pre_hooks.values()


def test_width_gate_spec_is_checked_at_the_stream_width():
    # the throw-away spec check built a 4096-unit gate: a fixed mask of the stream's own width was refused
    bert = _build("bert")
    width = bert.config.hidden_size
    mask = [True] * (width - 4) + [False] * 4
    ds.sparsify_(bert, {"width": {"gate": "fixed", "mask": mask}})
    assert bert.width.gate.keep_mask().tolist() == mask
    other = _build("bert")
    with pytest.raises(ConfigError, match=rf"'width' \(the {width}-unit gate of 'width'\).*mask"):
        ds.sparsify_(other, {"width": {"gate": "fixed", "mask": [True] * (width + 1)}})
    with pytest.raises(ConfigError, match=rf"'width' \(the {width}-unit gate of 'width'\).*k must be"):
        ds.sparsify_(other, {"width": {"gate": "topk", "k": width + 1}})
    assert not list(ds.named_gates(other))


def test_width_refuses_an_unknown_module_whatever_its_name():
    """Only dynsparse's own gates are exempt from the coverage check: a user's module called ``gate`` (a router, a
    gating head) that reads the stream is refused like any other unknown module, not skipped by its name."""

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _build("llama").model
            self.gate = torch.nn.Linear(32, 4)  # reads the residual stream

    model = Routed()
    with pytest.raises(UnsupportedModuleError, match=r"'gate' \(Linear\)"):
        ds.sparsify_(model, {"width": "fixed"})
    assert not list(ds.named_gates(model))
    gated = _build("llama")  # the model's own gates are still exempt when a second dimension is added later
    ds.sparsify_(gated, {"heads": "fixed"})
    ds.sparsify_(gated, {"width": "fixed"})
    assert gated.width.gate.num_units == 32

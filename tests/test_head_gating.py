"""Per-input attention heads (Deja Vu's head predictor): exact gathered path, batching, knob, predictor, saving."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynsparse as ds
from dynsparse.errors import ConfigError, GateError, UnsupportedModuleError
from dynsparse.gates.head_gates import DejaVuHeadGate, head_labels
from dynsparse.layers.head_gating import (
    HeadGatedAttention,
    gate_heads_,
    head_spec,
    set_head_strategy_,
    train_head_predictors_,
)

ARCH = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=6, num_classes=5),
}


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH["name"], pretrained=False, **{**ARCH["kwargs"], **kw}).eval()


def _randomise(m: nn.Module, seed: int = 0) -> nn.Module:
    """Random predictors, so the inputs of a batch choose different heads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in m.modules():
            if isinstance(a, HeadGatedAttention):
                for p in a.heads.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _layer(keep=0.5, dtype=torch.float64, **kw) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(Attention(24, num_heads=4, **kw)).to(dtype).eval()
    return _randomise(gate_heads_(m, "dejavu", keep=keep))


def _run(m, x, strategy, **kw):
    set_head_strategy_(m, strategy)
    with torch.no_grad():
        return m[0](x, **kw) if isinstance(m, nn.Sequential) else m(x)


OPTIONS = {
    "plain": {},
    "qkv_bias": {"qkv_bias": True},
    "qk_norm": {"qk_norm": True, "norm_layer": nn.LayerNorm},
    "gated_output": {"gated": True, "qkv_bias": True},
    "head_dim": {"attn_head_dim": 5},
    "no_proj_bias": {"proj_bias": False},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_gathered_equals_masked_on_the_same_decisions(option, fused, batch):
    m = _layer(**OPTIONS[option])
    m[0].fused_attn = fused
    x = torch.randn(batch, 9, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    ref = _run(m, x, "mask")
    torch.testing.assert_close(_run(m, x, "auto"), ref, atol=1e-12, rtol=1e-10)
    if batch > 1:
        assert len(torch.unique(m[0].heads(x), dim=0)) > 1  # the batch really mixes head sets


def test_masked_path_drops_exactly_the_heads_not_kept():
    """The masked reference equals the host with the dropped heads' ``proj`` columns zeroed."""
    m = _layer()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    keep = m[0].heads(x)[0]
    host = Attention(24, num_heads=4).to(torch.float64).eval()
    host.load_state_dict({k: v for k, v in m[0].state_dict().items() if not k.startswith("heads.")})
    with torch.no_grad():
        cols = keep.repeat_interleave(host.head_dim)
        host.proj.weight[:, ~cols] = 0
        torch.testing.assert_close(_run(m, x, "mask"), host(x), atol=1e-12, rtol=1e-10)


def test_batch_equals_one_by_one_and_every_input_keeps_k_heads():
    m = _randomise(ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}}))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
        ones = torch.cat([m(x[i : i + 1]) for i in range(6)])
        tokens = m.patch_embed(x)  # any (B, N, C) input: the gate keeps k = 3 of 6 heads per input
        assert m.blocks[0].attn.heads(tokens).sum(1).tolist() == [3] * 6
    torch.testing.assert_close(y, ones, atol=1e-5, rtol=1e-5)


def test_attention_masks_are_cut_to_the_heads_and_inputs():
    m = _layer()
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    per_head = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64)
    for mask in (per_head, torch.rand(3, 1, 9, 9, generator=g) > 0.3, per_head[:1, :1]):
        if mask.dtype == torch.bool:
            mask[..., 0] = True  # every query sees a key
        ref = _run(m, x, "mask", attn_mask=mask)
        torch.testing.assert_close(_run(m, x, "auto", attn_mask=mask), ref, atol=1e-12, rtol=1e-10)


def test_keep_one_is_the_host():
    m = _vit()
    gated = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 1.0}})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), m(x), atol=0, rtol=0)


def _flops(m, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    return fc.get_total_flops()


def test_knob_is_monotone_in_flops():
    m = _randomise(ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}}))
    x = torch.randn(2, 3, 32, 32)
    flops = []
    for keep in (1.0, 0.8, 0.5, 0.3, 0.1):
        with ds.budget(m, keep):
            flops.append(_flops(m, x))
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1], flops
    assert m.blocks[0].attn.heads.keep == 0.5  # restored


def test_head_labels_are_the_top_heads_by_norm():
    norms = torch.tensor([[0.1, 3.0, 2.0, 0.5], [4.0, 0.0, 1.0, 2.0]])
    assert head_labels(norms, 0.5).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert head_labels(norms, 0.01).sum(1).tolist() == [1, 1]  # at least one head


def test_predictor_learns_which_heads_an_input_needs():
    """A synthetic layer where the input's first features say which heads have large values."""
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4).eval()
    with torch.no_grad():
        attn.qkv.weight.zero_()
        v = attn.qkv.weight[32:]  # value rows: head h's values read feature h
        for h in range(4):
            v[h * 4 : (h + 1) * 4, h] = 1.0
    m = gate_heads_(nn.Sequential(attn), "dejavu", keep=0.5)

    def batch(n):
        x = torch.randn(n, 5, 16) * 0.1
        x[:, :, :4] += torch.rand(n, 1, 4) * 3  # positive, the same for all tokens of an input
        return x

    test = batch(512)
    with torch.no_grad():
        truth = head_labels(test[:, :, :4].mean(1), 0.5)  # uniform attention: head h's output is feature h
    before = _recall(m, test, truth)
    recall = train_head_predictors_(m, [batch(256) for _ in range(8)], epochs=40, lr=1e-2)
    after = _recall(m, test, truth)
    assert before < 0.7 and after > 0.85 and recall["0"] > 0.85, (before, after, recall)


def _recall(m, x, truth):
    with torch.no_grad():
        pred = m[0].heads(x)
    return float((pred & truth).sum() / truth.sum())


def test_training_mode_runs_the_masked_path_with_gradients():
    m = _randomise(ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}})).train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    w = m.blocks[0].attn.qkv.weight.grad
    assert w is not None and torch.isfinite(w).all()


def test_convert_save_load_round_trip(tmp_path):
    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5, "rank": 8}})
    x = torch.randn(3, 3, 32, 32)
    train_head_predictors_(m, [x], epochs=2)
    ds.set_budget_(m, {"blocks.1.attn.heads": 0.34})
    small = ds.convert(m, static=False)
    assert small.slice_plan.dynamic["heads"] == head_spec(m)
    ds.save(small, tmp_path / "h.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "h.safetensors")
    assert isinstance(back.blocks[0].attn, HeadGatedAttention) and back.blocks[1].attn.heads.keep == 0.34
    assert back.blocks[0].attn.heads.rank == 8
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_export_and_trace_run_the_masked_path():
    m = _randomise(ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}}))
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = m(other)
        ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=8)},))
        torch.testing.assert_close(ep.module()(other), want, atol=1e-5, rtol=1e-5)
        traced = torch.jit.trace(m, (other,), check_trace=False)
        torch.testing.assert_close(traced(other), want, atol=1e-5, rtol=1e-5)


def test_bad_options_raise_clearly():
    with pytest.raises(ConfigError, match="Did you mean 'dejavu'"):
        gate_heads_(_vit(), "dejav")
    for keep in (0.0, 1.5, True):
        with pytest.raises((ConfigError, GateError), match="keep"):
            ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": keep}})
    with pytest.raises(ConfigError, match="per must be 'input'"):
        gate_heads_(_vit(), "dejavu", per="token")
    with pytest.raises(ConfigError, match="rank"):
        gate_heads_(_vit(), "dejavu", rank=0)
    with pytest.raises(ConfigError, match=r"heads gate 'dejavu'.*bogus"):
        gate_heads_(_vit(), "dejavu", bogus=1)
    with pytest.raises(ConfigError, match="strategy"):
        gate_heads_(_vit(), "dejavu", strategy="fast")
    with pytest.raises(UnsupportedModuleError, match="no timm Attention"):
        gate_heads_(nn.Sequential(nn.Linear(3, 3)), "dejavu")
    m = gate_heads_(_vit(), "dejavu")
    with pytest.raises(UnsupportedModuleError, match="already"):
        gate_heads_(m, "dejavu")
    with pytest.raises(ConfigError, match="strategy"):
        set_head_strategy_(m, "fast")
    with pytest.raises(ConfigError, match="no per-input head gate"):
        train_head_predictors_(_vit(), [torch.randn(1, 3, 32, 32)])
    with pytest.raises(ConfigError, match=r"heads\.keep.*'blocks.9.attn'"):
        gate_heads_(_vit(), "dejavu", keep={"blocks.9.attn": 0.5})
    with pytest.raises(ConfigError, match="no module 'nope'"):
        gate_heads_(_vit(), "dejavu", modules=["nope"])


def test_unsupported_layers_and_token_gates_are_refused_by_name():
    m = nn.Sequential(Attention(8, num_heads=2, scale_norm=True, norm_layer=nn.LayerNorm))
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Attention\).*scale_norm"):
        gate_heads_(m, "dejavu", modules=["0"])
    with pytest.raises(UnsupportedModuleError, match="token gates"):
        ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1]}, "heads": {"gate": "dejavu"}})
    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu"}})
    with pytest.raises(ConfigError, match=r"per-input head gates.*blocks.0.attn"):
        ds.sparsify_(m, {"tokens": {"gate": "cls_attention", "blocks": [1]}})
    assert not any(type(b).__name__ == "TokenGatedBlock" for b in m.blocks)


def test_sparsify_routes_heads_and_static_head_gates_still_work():
    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.25, "rank": 8}})
    g = m.blocks[2].attn.heads
    assert isinstance(g, DejaVuHeadGate) and g.rank == 8 and g.keep == 0.25 and g.owner == "blocks.2.attn"
    assert ds.get_budget(m)["blocks.2.attn.heads"] == 0.25
    static = ds.sparsify_(_vit(), {"heads": {"gate": "hard_concrete"}})
    assert not any(isinstance(x, HeadGatedAttention) for x in static.modules())


def test_report_and_analyse_name_the_heads_dimension(tmp_path):
    from dynsparse.commands.analyse import analyse

    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}})
    rep = ds.sparsity_report(m, torch.randn(1, 3, 32, 32))
    assert [r.dimension for r in rep.input_dependent] == ["heads"] and rep.input_dependent[0].gates == 3
    ds.save(ds.convert(m, static=False), tmp_path / "h.safetensors", arch=ARCH)
    rows = analyse(str(tmp_path / "h.safetensors"))["gates"]
    assert {r["dimension"] for r in rows} == {"heads"} and rows[0]["keep"] == 0.5


def test_listed_modules_honour_include_and_exclude():
    """``modules`` and fqn globs together (``sparsify_``'s top-level globs join a part's own): both must select."""
    spec = {"heads": {"gate": "dejavu", "modules": ["blocks.0.attn", "blocks.1.attn"]}}
    m = ds.sparsify_(_vit(), spec, exclude="blocks.1*")
    assert [type(b.attn).__name__ for b in m.blocks][:2] == ["HeadGatedAttention", "Attention"]
    with pytest.raises(UnsupportedModuleError, match="check include / exclude"):
        gate_heads_(_vit(), "dejavu", modules=["blocks.1.attn"], include="blocks.0.*")


def _host_without_dropped_heads(a: HeadGatedAttention, heads: torch.Tensor) -> Attention:
    """A plain timm ``Attention`` holding only the heads ``heads`` of ``a`` (its weights sliced)."""
    d, width = a.head_dim, a.attn_dim
    host = Attention(
        a.qkv.in_features,
        num_heads=len(heads),
        attn_head_dim=d,
        dim_out=a.proj.out_features,
        qkv_bias=a.qkv.bias is not None,
        proj_bias=a.proj.bias is not None,
    ).to(a.qkv.weight.dtype)
    host.fused_attn = a.fused_attn
    el = (heads[:, None] * d + torch.arange(d)).flatten()
    rows = torch.cat([el, el + width, el + 2 * width])
    with torch.no_grad():
        host.qkv.weight.copy_(a.qkv.weight[rows])
        host.proj.weight.copy_(a.proj.weight[:, el])
        if a.proj.bias is not None:
            host.proj.bias.copy_(a.proj.bias)
    return host.eval()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask", ["H,N,N", "1,H,N,N", "B,H,N,N", "N,N", "causal"])
def test_gathered_equals_the_host_without_the_dropped_heads(fused, mask):
    """Per input: a plain timm ``Attention`` with only the kept heads, the mask cut to them (a (H, N, N) mask too)."""
    m = _layer(attn_head_dim=5, dim_out=7, proj_bias=False)
    a = m[0]
    a.fused_attn = fused
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 24, dtype=torch.float64, generator=g)
    shape = {"H,N,N": (4, 9, 9), "1,H,N,N": (1, 4, 9, 9), "B,H,N,N": (3, 4, 9, 9), "N,N": (9, 9)}.get(mask)
    kw = {"is_causal": True} if shape is None else {"attn_mask": torch.randn(shape, dtype=torch.float64, generator=g)}
    y = _run(m, x, "auto", **kw)
    with torch.no_grad():
        keep = a.heads(x)
        for i in range(3):
            heads = keep[i].nonzero().squeeze(1)
            one = dict(kw)
            if shape is not None:
                am = kw["attn_mask"]
                if am.dim() >= 3:
                    am = am.index_select(am.dim() - 3, heads)
                one["attn_mask"] = am[i : i + 1] if am.dim() == 4 and am.shape[0] == 3 else am
            want = _host_without_dropped_heads(a, heads)(x[i : i + 1], **one)
            torch.testing.assert_close(y[i : i + 1], want, atol=1e-12, rtol=1e-10)


def test_contribution_labels_go_through_timms_output_gate():
    """``label="contribution"`` measures what a head adds through ``proj``, after timm's ``gated=True`` gate."""
    from dynsparse.layers.head_gating import head_norms

    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, gated=True, qkv_bias=True).eval()
    with torch.no_grad():
        attn.gate.bias[:4] = -50.0  # head 0's output never reaches proj
    m = gate_heads_(nn.Sequential(attn), "dejavu")
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _, o = m[0]._masked(x, None, False, None)
        norms = head_norms(m[0], o, "contribution", x=x)
        for h in range(4):  # the truth: the layer with head h alone, minus proj's bias
            keep = torch.zeros(2, 4, dtype=torch.bool)
            keep[:, h] = True
            alone = m[0]._masked(x, None, False, keep)[0] - attn.proj.bias
            torch.testing.assert_close(norms[:, h], alone.norm(dim=-1).mean(-1))
    with pytest.raises(ConfigError, match=r"'0'.*output gate.*x"):
        head_norms(m[0], o, "contribution")


def test_predictor_training_restores_each_modules_mode_and_reads_only_max_batches():
    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu"}}, exclude="blocks.1*")  # one layer not gated
    m.train()
    m.blocks[0].norm1.eval()  # a frozen part of a model in training
    m.blocks[2].attn.heads.eval()
    modes = {f: x.training for f, x in m.named_modules()}
    read = []

    def batches():
        for i in range(5):
            read.append(i)
            yield torch.randn(2, 3, 32, 32)

    train_head_predictors_(m, batches(), epochs=1, max_batches=2)
    assert {f: x.training for f, x in m.named_modules()} == modes
    assert read == [0, 1]  # a shared iterator loses no batch
    for bad in ({"max_rows": 0}, {"batch_size": 0}, {"epochs": 0}, {"holdout": 1.0}):
        with pytest.raises(ConfigError, match=f"train_head_predictors_: {next(iter(bad))}"):
            train_head_predictors_(m, [torch.randn(2, 3, 32, 32)], **bad)


def test_weight_cache_is_rebuilt_after_training_with_a_fused_optimizer():
    """A fused optimizer step changes ``proj.weight`` without bumping its version: eval must not use the old copy."""
    m = _layer(dtype=torch.float32)
    x = torch.randn(3, 9, 24)
    _run(m, x, "auto")  # caches proj's transposed weight
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        m.train()
        m(x).sum().backward()
        opt.step()
        m.eval()
        torch.testing.assert_close(_run(m, x, "auto"), _run(m, x, "mask"), atol=1e-5, rtol=1e-5)


def test_predictor_passes_run_the_other_per_input_gates_dense(monkeypatch):
    """Neuron and head predictors in one model: each one's labels come from the dense model, not one thinned out
    by the other's untrained gates; the budgets are back afterwards."""
    from dynsparse.layers.neuron_gating import NeuronGated, train_predictors_

    m = _randomise(ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}, "neurons": {"gate": "dejavu"}}))
    ds.set_budget_(m, {"blocks.0.mlp.neurons": 0.25})
    before = ds.get_budget(m)
    dropped, grouped, sparse = [], HeadGatedAttention._grouped, NeuronGated._sparse

    def heads(self, x, mask, causal, keep):
        dropped.append(int((~keep).sum()))
        return grouped(self, x, mask, causal, keep)

    def neurons(self, rows, g, keep, n):
        dropped.append(int((~keep).sum()))
        return sparse(self, rows, g, keep, n)

    monkeypatch.setattr(HeadGatedAttention, "_grouped", heads)
    monkeypatch.setattr(NeuronGated, "_sparse", neurons)
    x = torch.randn(4, 3, 32, 32)
    r1 = train_predictors_(m, [x], epochs=1)
    r2 = train_head_predictors_(m, [x], epochs=1)
    assert len(r1) == len(r2) == 3 and sum(dropped) == 0  # no head and no neuron left out in either pass
    assert ds.get_budget(m) == before


def test_static_heads_on_per_input_heads_are_refused_as_already_gated_and_layers_still_work():
    m = ds.sparsify_(_vit(), {"heads": {"gate": "dejavu", "keep": 0.5}})
    with pytest.raises(UnsupportedModuleError, match=r"'blocks.0.attn' \(HeadGatedAttention\).*already gated"):
        ds.sparsify_(m, {"heads": {"gate": "hard_concrete"}})
    ds.sparsify_(m, {"layers": {"gate": "fixed"}})
    ds.fix_gates_(m, {"blocks.1.drop_path2": torch.tensor([False])})
    x = torch.randn(2, 3, 32, 32)
    small = ds.convert(m, static=False)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), atol=1e-5, rtol=1e-5)

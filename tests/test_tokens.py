"""Token gates: gathered inference equals masked inference, prefix tokens kept, per-input decisions, the knob."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.gates.tokens import ClsAttentionTokenGate, cls_attention
from dynsparse.layers.tokens import PolicyBlock, TokenGatedBlock, TokenSelect

GATES = ["cls_attention", "predictor"]


def _vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()


def _mask_inference(model, on: bool) -> None:
    for b in model.blocks:
        if isinstance(b, TokenGatedBlock):
            b.tokens.mask_inference = on


def _x(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"reg_tokens": 2, "class_token": True}, {"init_values": 0.1}])
def test_gathered_equals_masked_inference(gate, kw):
    """The fast path (gather the kept tokens) gives the masked-attention output on the same decisions."""
    _assert_fast_equals_masked(ds.sparsify_(_vit(**kw), {"tokens": {"gate": gate, "blocks": [1, 3], "keep": 0.4}}))


def _assert_fast_equals_masked(m) -> None:
    """In float64: the gathered / packed output equals the masked-inference output on the same decisions."""
    m, x = m.double(), _x()
    with torch.no_grad():
        fast = m(x)
        _mask_inference(m, True)
        slow = m(x)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize(
    "tokens",
    [
        {"gate": "cls_attention", "blocks": [1, 4], "keep": 0.4},
        {"gate": "threshold", "blocks": [1, 3], "final_threshold": 4.0},
    ],
)
def test_masked_reference_equals_fast_path_with_mean_and_max_pooling(pool, tokens):
    """The masked reference hides the dropped tokens from the head's pooling too (not only from attention)."""
    _assert_fast_equals_masked(ds.sparsify_(_vit(global_pool=pool), {"tokens": tokens}))


@pytest.mark.parametrize("gate", GATES)
def test_per_input_decisions_equal_one_by_one(gate):
    m = ds.sparsify_(_vit(), {"tokens": {"gate": gate, "blocks": [0, 2], "keep": 0.5}}).double()
    x = _x(4)
    with torch.no_grad():
        batch = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, single, atol=1e-10, rtol=1e-10)


def test_inputs_of_a_batch_choose_different_tokens():
    m = _vit()
    sel = TokenSelect(ClsAttentionTokenGate(64, keep=0.25, dim=32), num_prefix=1)
    x = torch.randn(4, 65, 32)
    idx = sel.keep_index(sel.gate.scores(x, x, m.blocks[0].attn, 1))
    assert idx.shape == (4, 16) and len({tuple(r.tolist()) for r in idx}) > 1
    assert torch.equal(idx, idx.sort(dim=1).values)  # original order kept


@pytest.mark.parametrize("fuse", [False, True])
def test_prefix_tokens_always_kept(fuse):
    """Class, distillation and register tokens pass untouched; kept tokens are rows of the input."""
    m = _vit(reg_tokens=3)
    P = m.num_prefix_tokens
    assert P == 4
    sel = TokenSelect(ClsAttentionTokenGate(64, keep=0.1, dim=32), num_prefix=P, fuse=fuse)
    x = torch.randn(2, P + 64, 32)
    out = sel(x, x, m.blocks[0].attn)
    k = math.ceil(0.1 * 64)
    assert out.shape == (2, P + k + int(fuse), 32)
    assert torch.equal(out[:, :P], x[:, :P])
    for b in range(2):
        rows = {tuple(r.tolist()) for r in x[b, P:]}
        assert all(tuple(r.tolist()) in rows for r in out[b, P : P + k])


def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens():
    m = _vit()
    attn = m.blocks[0].attn
    sel = TokenSelect(ClsAttentionTokenGate(64, keep=0.25, dim=32), num_prefix=1, fuse=True)
    x = torch.randn(2, 65, 32, dtype=torch.float64)
    attn.double()
    out = sel(x, x, attn)
    a = cls_attention(x, attn, 1)
    idx = sel.keep_index(a)
    dropped = torch.ones_like(a, dtype=torch.bool).scatter_(1, idx, False)
    want = torch.einsum("bn,bnc->bc", a * dropped, x[:, 1:])
    torch.testing.assert_close(out[:, -1], want)


def test_cls_attention_matches_the_blocks_softmax():
    """The gate's score is the class-token row of the block's own attention, averaged over heads."""
    for kw in ({}, {"qk_norm": True}):
        m = _vit(**kw).double()
        attn = m.blocks[0].attn
        h = torch.randn(2, 65, 32, dtype=torch.float64)
        B, N = h.shape[:2]
        q, k, _ = attn.qkv(h).reshape(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
        torch.testing.assert_close(cls_attention(h, attn, 1), full[:, :, 0, 1:].mean(1))


def test_knob_is_monotone_and_keep_one_is_dense():
    dense = _vit()
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1, 3], "keep": 0.5}})
    x = _x().float()
    flops = []
    for keep in (0.1, 0.25, 0.5, 0.75, 1.0):
        with ds.budget(m, keep):
            flops.append(ds.flops.count_flops(m, x))
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": 0.5, "blocks.3.tokens.gate": 0.5}  # restored
    with torch.no_grad(), ds.budget(m, 1.0):
        torch.testing.assert_close(m(x), dense(x))
        assert flops[-1] > ds.flops.count_flops(dense, x)  # keep 1: only the gate's scoring added


def test_structure_keys_and_training():
    m = _vit()
    keys = set(m.state_dict())
    ds.sparsify_(m, {"tokens": {"gate": "predictor", "blocks": [1, 3], "keep": 0.7}})
    assert isinstance(m.blocks[1], TokenGatedBlock) and isinstance(m.blocks[2], PolicyBlock)
    assert isinstance(m.blocks[0], timm.models.vision_transformer.Block) and not isinstance(m.blocks[0], PolicyBlock)
    new = set(m.state_dict()) - keys
    assert keys <= set(m.state_dict()) and all(
        k.startswith(("blocks.1.tokens.gate.", "blocks.3.tokens.gate.")) for k in new
    )
    assert m.blocks[3].tokens.gate.target == pytest.approx(0.49)
    m.train()
    out = m(_x().float())
    loss = out.logsumexp(-1).mean() + ds.penalty(m)
    loss.backward()
    for name, p in m.named_parameters():
        if ".tokens.gate." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "blocks.1.tokens.gate.out_conv" in n)
    assert float(ds.penalty(m).detach()) > 0
    m.eval()
    assert float(ds.penalty(m)) == 0.0


def test_masked_attention_ignores_dropped_tokens():
    """DynamicViT's policy attention: kept queries see no dropped key; with an all-ones policy it is attention."""
    from dynsparse.layers.tokens import masked_attention

    attn = _vit().blocks[0].attn.double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    policy = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 0]] * 2, dtype=torch.float64)
    y = masked_attention(attn, x, policy, eps=0.0)
    x2 = x.clone()
    x2[:, policy[0] == 0] += torch.randn_like(x2[:, policy[0] == 0])
    y2 = masked_attention(attn, x2, policy, eps=0.0)
    kept = policy[0] == 1
    torch.testing.assert_close(y[:, kept], y2[:, kept])
    torch.testing.assert_close(masked_attention(attn, x, torch.ones_like(policy), eps=0.0), attn(x))
    gathered = attn(x[:, kept])
    torch.testing.assert_close(y[:, kept], gathered)


def test_errors_name_the_problem():
    with pytest.raises(ds.ConfigError, match=r"unknown token gate 'cls_atention'.*Did you mean 'cls_attention'"):
        ds.sparsify_(_vit(), {"tokens": {"gate": "cls_atention"}})
    with pytest.raises(ds.ConfigError, match=r"tokens.blocks: block indices in \[0, 5\)"):
        ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [7]}})
    with pytest.raises(ds.ConfigError, match="fuse=True needs a gate with attention-like scores"):
        ds.sparsify_(_vit(), {"tokens": {"gate": "predictor", "blocks": [1], "fuse": True}})
    with pytest.raises(ds.ConfigError, match="fuse must be true or false, got 3"):
        ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1], "fuse": 3}})
    with pytest.raises(ds.ConfigError, match="class-token pooling"):
        ds.sparsify_(_vit(global_pool="avg"), {"tokens": {"gate": "predictor", "blocks": [1]}})
    with pytest.raises(ds.ConfigError, match="has no `blocks`"):
        ds.sparsify_(timm.create_model("test_resnet"), {"tokens": "cls_attention"})
    with pytest.raises(ds.GateError, match="ClsAttentionTokenGate: keep must be a fraction"):
        ds.set_budget_(ds.sparsify_(_vit(), {"tokens": {"blocks": [1]}}), 1.5)
    with pytest.raises(ds.ConfigError, match="no input-dependent gate"):
        ds.set_budget_(_vit(), 0.5)


def test_knob_curve_table_and_plot(tmp_path):
    from dynsparse.bench import knob_curve

    dense = _vit()
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    x = _x(4).float()
    y = dense(x).argmax(-1)
    curve = knob_curve(
        m,
        dense,
        lambda mod: (mod(x).argmax(-1) == y).float().mean().item(),
        x,
        keeps=[1.0, 0.5, 0.25],
        batch_sizes=[1, 4],
        rounds=2,
    )
    assert [p.keep for p in curve.points] == [1.0, 0.5, 0.25]
    assert curve.points[0].metric == curve.dense_metric == 1.0
    assert curve.points[0].flops_ratio > curve.points[1].flops_ratio > curve.points[2].flops_ratio
    assert curve.table().count("\n") == 5 and "b4 ms (speed-up)" in curve.table()
    assert curve.plot(tmp_path / "k.png").read_bytes()[:4] == b"\x89PNG"
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": 0.5}


def test_converted_dynamic_model_saves_and_loads(tmp_path):
    arch = {
        "name": "vit_small_patch16_224",
        "kwargs": dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7),
    }
    for gate in GATES:
        m = ds.sparsify_(_vit(), {"tokens": {"gate": gate, "blocks": [1, 3], "keep": [0.5, 0.6]}})
        x = _x(2).float()
        with pytest.raises(ds.ConfigError, match="static=False"):
            ds.convert(m)
        small = ds.convert(m, static=False, verify_inputs=x)
        ds.save(small, tmp_path / f"{gate}.safetensors", arch=arch)
        back = ds.load(tmp_path / f"{gate}.safetensors")
        assert isinstance(back.blocks[1], TokenGatedBlock) and ds.get_budget(back) == ds.get_budget(m)
        with torch.no_grad():
            torch.testing.assert_close(back(x), m(x))


def test_recipe_trains_converts_and_reloads_a_token_model(tmp_path):
    """A stage gates tokens with a trained predictor (ratio loss, distillation); the saved model reloads."""
    import yaml

    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.run import run_recipe

    recipe = parse_recipe(
        yaml.safe_load(
            """
name: tok
seed: 0
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 3, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 128}
stages:
  - {name: dense, epochs: 1}
  - name: tokens
    epochs: 1
    sparsify: {tokens: {gate: predictor, blocks: [1], keep: 0.5}}
    regularizers: [{name: dynamic}]
    distill: {weight: 1.0}
convert: {static: false}
evaluate: {latency: false}
"""
        )
    )
    report = run_recipe(recipe, tmp_path, progress=False)
    assert report["flops"]["converted"] < 0.8 * report["flops"]["dense"]
    back = ds.load(tmp_path / "model.safetensors")
    assert isinstance(back.blocks[1], TokenGatedBlock) and ds.get_budget(back) == {"blocks.1.tokens.gate": 0.5}

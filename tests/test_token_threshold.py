"""Threshold token gates (LTP): variable token counts per input, packed batches, the calibrated knob, training."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.gates.tokens import ThresholdTokenGate, received_attention
from dynsparse.layers.neuron_gating import gate_neurons_
from dynsparse.layers.token_pack import Packing, packed_attention, select_tokens, unpack
from dynsparse.layers.tokens import TokenGatedBlock, calibrate_tokens_

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**ARCH, **kw}).eval()


def _x(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return x * torch.linspace(0.2, 3.0, n, dtype=torch.float64).view(n, 1, 1, 1)  # different contrasts


def _threshold(model, blocks=(1, 3), **opts):
    spec = {"gate": "threshold", "blocks": list(blocks), "threshold": 1.0, **opts}
    return ds.sparsify_(model, {"tokens": spec}).double()


def _lengths(model, x):
    """Tokens per input after each gate (prefix included)."""
    seen = []

    def grab(mod, args, out):
        pk = mod._token_state.packing
        seen.append(pk.lengths if pk is not None else [out.shape[1]] * out.shape[0])

    hooks = [b.register_forward_hook(grab) for b in model.blocks if isinstance(b, TokenGatedBlock)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _one_by_one(model, x):
    with torch.no_grad():
        return torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])


@pytest.mark.parametrize("mode", ["pad", "loop"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"global_pool": "avg"},
        {"global_pool": "max"},
        {"global_pool": "avgmax"},
        {"reg_tokens": 2},
        {"qk_norm": True},
    ],
)
def test_variable_batch_equals_inputs_one_by_one(kw, mode):
    """Inputs keep different token counts; the packed batch gives what each input gives alone (every pooling)."""
    m = _threshold(_vit(**kw))
    m.blocks[1]._token_state.attention = mode
    x = _x()
    lengths = _lengths(m, x)
    assert len(set(lengths[0])) > 1 and len(set(lengths[1])) > 1, lengths
    with torch.no_grad():
        batch = m(x)
    torch.testing.assert_close(batch, _one_by_one(m, x), atol=1e-10, rtol=1e-10)


def test_pad_and_loop_attention_agree_with_scores():
    attn = _vit().blocks[0].attn.double().requires_grad_(False)
    pk = Packing([5, 9, 3, 9])
    h = torch.randn(1, pk.total, 32, dtype=torch.float64)
    (a, sa), (b, sb) = (packed_attention(attn, h, pk, scores=True, mode=m) for m in ("pad", "loop"))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa, sb)
    for i, (start, n) in enumerate(zip(pk.offsets, pk.lengths, strict=True)):  # each input alone
        alone = h[:, start : start + n]
        torch.testing.assert_close(a[0, start : start + n], attn(alone)[0])
        torch.testing.assert_close(sa[i, :n], received_attention(alone, attn)[0])
        assert torch.isinf(sa[i, n:]).all() and abs(float(sa[i, :n].sum()) - n) < 1e-9  # scores average to 1


def test_gathered_equals_masked_inference_on_the_same_decisions():
    m = _threshold(_vit(reg_tokens=1))
    x = _x()
    with torch.no_grad():
        fast = m(x)
        for b in m.blocks:
            if isinstance(b, TokenGatedBlock):
                b.tokens.mask_inference = True
        slow = m(x)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)


def test_prefix_tokens_always_kept_and_never_ranked():
    P = 3
    pk = Packing([P + 4, P + 6])
    x = torch.randn(1, pk.total, 8)
    s = torch.randn(2, pk.nmax).masked_fill(~pk.valid, float("-inf"))
    s[:, :P] = -100.0  # prefix tokens scoring lowest are still kept
    out, new = select_tokens(x, s, pk, torch.tensor(float("inf")), P)
    assert new.lengths == [P + 1, P + 1]  # only the prefix and each input's best token survive
    for b, start in enumerate(pk.offsets):
        best = int(s[b, P:].argmax()) + P
        got = out.reshape(-1, 8)[new.offsets[b] : new.offsets[b] + P + 1]  # (B, n, C): the counts are equal
        torch.testing.assert_close(got, torch.cat([x[0, start : start + P], x[0, start + best : start + best + 1]]))
    kept, _ = select_tokens(x, s, pk, torch.tensor(float("-inf")), P)
    torch.testing.assert_close(kept, x)  # unequal counts: still packed (1, T, C)


def test_unpack_pads_with_the_mean():
    pk = Packing([3, 5])
    x = torch.randn(1, 8, 4, dtype=torch.float64)
    y = unpack(x, pk, num_prefix=1)
    assert y.shape == (2, 5, 4)
    torch.testing.assert_close(y[0, 1:].mean(0), x[0, 1:3].mean(0))
    torch.testing.assert_close(y[0, 1:].amax(0), x[0, 1:3].amax(0))


def test_knob_is_calibrated_monotone_and_keep_one_is_dense():
    dense = _vit().double()
    m = _threshold(_vit())
    x = _x(6)
    with pytest.raises(ds.ConfigError, match="needs a score table"), torch.no_grad():
        ds.set_budget_(m, 0.5)(x)
    calibrate_tokens_(m, [x[:3], x[3:]])
    assert all(int(b.tokens.gate.calibrated) == 1 for b in m.blocks if isinstance(b, TokenGatedBlock))
    flops = []
    for keep in (0.1, 0.3, 0.6, 0.9, 1.0):
        with ds.budget(m, keep):
            flops.append(ds.flops.count_flops(m, x))
    assert flops == sorted(flops) and len(set(flops)) == len(flops), flops
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": 0.5, "blocks.3.tokens.gate": 0.5}
    with torch.no_grad(), ds.budget(m, 1.0):
        torch.testing.assert_close(m(x), dense(x))
    ds.set_budget_(m, None)  # back to the learned thresholds
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": None, "blocks.3.tokens.gate": None}


def test_calibrated_keep_is_met_on_the_calibration_data():
    m = _threshold(_vit(), blocks=(1,))
    x = _x(8)
    calibrate_tokens_(m, x)
    for keep in (0.25, 0.5, 0.75):
        ds.set_budget_(m, keep)
        kept = sum(n - 1 for n in _lengths(m, x)[0]) / (8 * 64)
        assert abs(kept - keep) < 0.03, (keep, kept)


def test_initial_thresholds_follow_ltp_and_penalty_and_gradients_reach_theta():
    spec = {"gate": "threshold", "blocks": [1, 3], "final_threshold": 4.0}
    m = ds.sparsify_(_vit(), {"tokens": spec})
    gates = [m.blocks[i].tokens.gate for i in (1, 3)]
    assert [float(g.threshold.detach()) for g in gates] == pytest.approx([4.0 * 1 / 5, 4.0 * 3 / 5])  # θ_final · l / L
    with torch.no_grad():
        for g in gates:
            g.threshold.fill_(1.0)  # near the scores of this random model, so that the soft masks have slope
    m.train()
    out = m(_x().float())
    pen = ds.penalty(m)
    assert float(pen.detach()) > 0
    (out.logsumexp(-1).mean() + pen).backward()
    for g in gates:
        assert g.threshold.grad is not None and torch.isfinite(g.threshold.grad) and g.threshold.grad != 0
        assert int(g.calibrated) == 1  # the running score table was updated
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    m.eval()
    assert float(ds.penalty(m)) == 0.0


def test_target_penalty():
    g = ThresholdTokenGate(16, target=0.4, weight=2.0)
    g.record(torch.tensor(0.7))
    assert float(g.penalty()) == pytest.approx(2.0 * 0.3**2)
    g.target = None
    assert float(g.penalty()) == pytest.approx(2.0 * 0.7)


def test_gate_forward_matches_the_block_decisions():
    m = _threshold(_vit(), blocks=(0,))
    x = torch.randn(3, 65, 32, dtype=torch.float64)
    gate, attn = m.blocks[0].tokens.gate, m.blocks[0].attn
    keep = gate(x, x, attn, 1).bool()
    _, s = packed_attention(attn, x, Packing([65] * 3), scores=True)
    want = s[:, 1:] > gate.theta()
    want.scatter_(1, s[:, 1:].argmax(1, keepdim=True), True)
    assert torch.equal(keep, want)


def test_convert_save_load_round_trip(tmp_path):
    arch = {"name": "vit_small_patch16_224", "kwargs": ARCH}
    m = _threshold(_vit(), temperature=0.05, weight=0.1).float()
    x = _x(4).float()
    calibrate_tokens_(m, x)
    with torch.no_grad():
        m.blocks[3].tokens.gate.threshold.fill_(2.5)  # a "learned" value: must come back from the weights
    ds.set_budget_(m, {"blocks.1.tokens.gate": None, "blocks.3.tokens.gate": 0.6})
    small = ds.convert(m, static=False, verify_inputs=x)
    ds.save(small, tmp_path / "t.safetensors", arch=arch)
    back = ds.load(tmp_path / "t.safetensors")
    g = back.blocks[3].tokens.gate
    assert isinstance(g, ThresholdTokenGate) and float(g.threshold.detach()) == 2.5 and g.temperature == 0.05
    assert ds.get_budget(back) == ds.get_budget(m)
    torch.testing.assert_close(g.table, m.blocks[3].tokens.gate.table)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


@pytest.mark.parametrize(
    ("model_kw", "spec", "match"),
    [
        ({}, {"temperature": 0}, "temperature must be"),
        ({}, {"weight": -1}, "weight must be"),
        ({}, {"target": 1.5}, "target must be None or a fraction"),
        ({}, {"momentum": 0}, "momentum must be"),
        ({}, {"fuse": True}, "fuse=True needs a gate with attention-like scores"),
        ({}, {"final_threshold": "high"}, "tokens.final_threshold"),
        ({}, {"keep": 1.5}, "keep must be a fraction"),
        ({"global_pool": "avg", "fc_norm": False}, {}, "needs fc_norm"),
        ({"global_pool": "map"}, {}, "attention pooling"),
    ],
)
def test_errors_name_the_field(model_kw, spec, match):
    with pytest.raises(ds.DynsparseError, match=match):
        ds.sparsify_(_vit(**model_kw), {"tokens": {"gate": "threshold", "blocks": [1], **spec}})


def test_runtime_errors():
    with pytest.raises(ds.ConfigError, match="has no threshold token gate"):
        calibrate_tokens_(ds.sparsify_(_vit(), {"tokens": {"blocks": [1]}}), _x().float())
    m = ds.sparsify_(_vit(global_pool="avg"), {"tokens": {"gate": "threshold", "blocks": [1]}}).train()
    with pytest.raises(ds.ConfigError, match="class-token pooling"):
        m(_x().float())


def test_per_input_neuron_gates_are_refused_where_the_batch_is_packed():
    """A packed batch is one sequence: a per-input neuron gate would pick one neuron set for all its inputs."""
    neurons = {"gate": "dejavu", "keep": 0.5, "per": "input"}
    with pytest.raises(ds.ConfigError, match=r"blocks\.1\.mlp has a per-input neuron gate"):
        ds.sparsify_(_vit(), {"neurons": neurons, "tokens": {"gate": "threshold", "blocks": [1]}})
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "threshold", "blocks": [2]}})
    with pytest.raises(ds.ConfigError, match=r"neurons: blocks\.2\.mlp has a per-input neuron gate"):
        gate_neurons_(m, **neurons)
    ds.sparsify_(_vit(), {"neurons": {**neurons, "per": "token"}, "tokens": {"gate": "threshold", "blocks": [1]}})
    ds.sparsify_(_vit(), {"neurons": neurons, "tokens": {"gate": "cls_attention", "blocks": [1]}})


def test_an_empty_batch_runs_in_eval_and_training():
    m = _threshold(_vit())
    with torch.no_grad():
        assert m(_x(0)).shape == (0, 7)
    assert m.train()(_x(0)).shape == (0, 7)


def test_export_records_the_masked_path_and_keeps_per_input_decisions():
    """torch.export cannot hold data-dependent token counts: the exported graph decides per input, as eager does."""
    m = _threshold(_vit(global_pool="avg")).float()
    ep = torch.export.export(m, (_x(3).float(),))
    x = _x(3, seed=2).float()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)
    assert any(len(set(n)) > 1 for n in _lengths(m, x))  # the inputs keep different counts

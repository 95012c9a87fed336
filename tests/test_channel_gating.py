"""Per-input channel gates (FBS) in timm ResNets: gathered equals masked, batches equal one by one, the knob,
training, saving, and errors that name the problem."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynsparse as ds
from dynsparse.gates.channel_gates import CHANNEL_GATES, FBSGate
from dynsparse.layers.channel_gating import FBSBasicBlock, FBSBottleneck, channel_spec, gate_channels_

ARCH = {"name": "test_resnet", "kwargs": {"num_classes": 7}}  # BasicBlocks and Bottlenecks
STRATEGIES = ["auto", "group", "loop", "union", "grouped_conv"]


def _host(name="test_resnet", dtype=torch.float32):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=7).eval()
    with torch.no_grad():  # stand-in for training: BN statistics that are not the identity, no zero-init
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.3, 0.8)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m.to(dtype)


def _gated(name="test_resnet", keep=0.5, dtype=torch.float32, **kw):
    m = ds.sparsify_(_host(name, dtype), {"channels": {"gate": "fbs", "keep": keep, **kw}})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for trained gates: decisions that differ across inputs
        for gate in m.modules():
            if isinstance(gate, FBSGate):
                gate.fc.weight.copy_(torch.randn(gate.fc.weight.shape, generator=g, dtype=dtype) * 2)
    return m


def _x(n=4, size=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    return (torch.randn(n, 3, size, size, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 2).to(dtype)


def _set_strategy(m, strategy):
    for b in m.modules():
        if isinstance(b, (FBSBasicBlock, FBSBottleneck)):
            b.strategy = strategy


def test_sparsify_installs_twins_and_keeps_host_keys():
    host = _host()
    m = _gated()
    kinds = {type(b) for b in m.modules() if isinstance(b, (FBSBasicBlock, FBSBottleneck))}
    assert kinds == {FBSBasicBlock, FBSBottleneck}
    new = set(m.state_dict()) - set(host.state_dict())
    assert set(host.state_dict()) < set(m.state_dict()) and all(
        ".gate.conv1.fc." in k or ".gate.conv2.fc." in k for k in new
    )
    assert isinstance(m.layer1[0], timm.models.resnet.BasicBlock)  # a subclass: isinstance checks keep working
    assert "fbs" in CHANNEL_GATES
    assert all(0 < k <= 1 for k in ds.get_budget(m).values())


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t"])
def test_open_gates_equal_the_host(name):
    host = _host(name, torch.float64)
    m = ds.sparsify_(_host(name, torch.float64), {"channels": {"gate": "fbs", "keep": 1.0, "init_std": 0.0}})
    x = _x(2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), host(x))
        _set_strategy(m, "masked")
        torch.testing.assert_close(m(x), host(x))


@pytest.mark.parametrize("bottleneck_conv1", [True, False])
def test_gathered_equals_masked_on_the_same_decisions(bottleneck_conv1):
    m = _gated(dtype=torch.float64, bottleneck_conv1=bottleneck_conv1)
    x = _x(1, dtype=torch.float64)
    with torch.no_grad():
        fast = m(x)
        _set_strategy(m, "masked")
        slow = m(x)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)
    assert (fast - slow).abs().max() < 1e-9, f"max-abs diff {(fast - slow).abs().max():.3g}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_equals_inputs_one_by_one(strategy):
    m = _gated(dtype=torch.float64)
    _set_strategy(m, strategy)
    x = _x(5, dtype=torch.float64)
    with torch.no_grad():
        batch = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(len(x))])
        _set_strategy(m, "masked")
        masked = m(x)
    torch.testing.assert_close(batch, alone, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(batch, masked, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("strategy", [*STRATEGIES, "masked"])
def test_channels_last_keeps_its_layout_and_equals_nchw(strategy, n):
    import copy

    m = _gated()  # float32: the oneDNN path, where the memory format matters
    _set_strategy(m, strategy)
    fmt = torch.channels_last
    cl = copy.deepcopy(m).to(memory_format=fmt)
    x = _x(n, size=64)  # 16x16 maps in layer1: gathered runs, not only the masked fallback of tiny maps
    kept = []
    for b in cl.modules():
        if isinstance(b, (FBSBasicBlock, FBSBottleneck)):
            b.register_forward_hook(lambda _b, _a, out: kept.append(out.is_contiguous(memory_format=fmt)))
    with torch.no_grad():
        fast = cl.forward_features(x.contiguous(memory_format=fmt))
        nchw = m.forward_features(x)
        _set_strategy(m, "masked")
        masked = m.forward_features(x)
    assert kept and all(kept), f"{kept.count(False)} of {len(kept)} blocks returned a non-channels-last output"
    assert fast.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(fast, nchw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_inputs_make_different_decisions():
    m = _gated()
    x = _x(5)
    seen = []
    hook = m.layer2[0].register_forward_pre_hook(lambda b, a: seen.append(b.gate["conv1"].decide(a[0].mean((2, 3)))[0]))
    with torch.no_grad():
        m(x)
    hook.remove()
    assert torch.unique(seen[0], dim=0).shape[0] > 1


def test_float32_batch_matches_one_by_one():
    m = _gated()
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.cat([m(x[i : i + 1]) for i in range(4)]), rtol=1e-4, atol=1e-4)


def _flops(m, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    return fc.get_total_flops()


def test_knob_is_monotone_in_flops():
    m = _gated(keep=0.5)
    x = _x(1, size=64)
    flops = []
    for keep in (0.25, 0.5, 0.75, 1.0):
        with ds.budget(m, keep):
            flops.append(_flops(m, x))
    dense = _flops(_host(), x)
    assert flops == sorted(flops) and flops[0] < flops[-1], flops
    assert 0.3 * dense < flops[1] < 0.8 * dense  # keep 0.5 really skips work (and every conv is counted)
    assert ds.get_budget(m) and all(v == 0.5 for v in ds.get_budget(m).values())  # restored after the block


def test_keep_counts_channels_with_ceil():
    g = FBSGate(8, 10, keep=0.3)
    assert g.num_kept() == 3
    g.set_budget_(0.31)
    assert g.num_kept() == 4
    assert (g.eval()(torch.randn(3, 8)) > 0).sum(1).tolist() == [4, 4, 4]


def test_training_reaches_the_saliency_weights_and_penalty():
    m = _gated(weight=1e-3).train()
    out = m(_x(4))
    pen = ds.penalty(m)
    assert float(pen.detach()) > 0
    (out.logsumexp(-1).mean() + pen).backward()
    gates = [g for g in m.modules() if isinstance(g, FBSGate)]
    assert gates and all(g.fc.weight.grad is not None and g.fc.weight.grad.abs().sum() > 0 for g in gates)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    assert float(ds.penalty(m)) == 0.0


def test_convert_save_load_round_trip(tmp_path):
    m = _gated(keep=0.4, bottleneck_conv1=False)
    x = _x(3)
    small = ds.convert(m, static=False, verify_inputs=x)
    spec = small.slice_plan.dynamic["channels"]
    assert spec["gate"] == "fbs" and spec["keep"] == 0.4 and spec["bottleneck_conv1"] is False
    assert spec == channel_spec(m)
    ds.save(small, tmp_path / "c.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "c.safetensors")
    assert isinstance(back.layer1[0], FBSBasicBlock) and ds.get_budget(back) == ds.get_budget(m)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_convert_static_is_refused():
    with pytest.raises(ds.ConfigError, match=r"static=True.*input-dependent.*static=False"):
        ds.convert(_gated(), static=True)


def test_blocks_include_exclude():
    m = ds.sparsify_(_host(), {"channels": {"gate": "fbs", "blocks": [0]}})
    assert isinstance(m.layer1[0], FBSBasicBlock) and not isinstance(m.layer2[0], (FBSBasicBlock, FBSBottleneck))
    m = ds.sparsify_(_host(), {"channels": {"gate": "fbs", "blocks": ["layer3.0"]}})
    assert isinstance(m.layer3[0], FBSBottleneck) and not isinstance(m.layer1[0], FBSBasicBlock)
    m = ds.sparsify_(_host(), {"channels": {"gate": "fbs", "exclude": "layer1.*"}})
    assert not isinstance(m.layer1[0], FBSBasicBlock) and isinstance(m.layer3[0], FBSBottleneck)
    m = ds.sparsify_(_host(), {"channels": {"gate": "fbs", "include": ["layer1.*"]}})
    assert isinstance(m.layer1[0], FBSBasicBlock) and not isinstance(m.layer3[0], FBSBottleneck)


def test_static_channel_gates_still_work():
    m = ds.sparsify_(_host(), {"channels": {"gate": "hard_concrete"}})
    assert not any(isinstance(b, (FBSBasicBlock, FBSBottleneck)) for b in m.modules())
    assert any(type(b).__name__ == "GatedBasicBlock" for b in m.modules())


@pytest.mark.parametrize(
    ("opts", "error", "match"),
    [
        ({"keep": 1.5}, ds.ConfigError, r"channels.keep: a fraction in \(0, 1\]"),
        ({"keep": 0}, ds.ConfigError, r"channels.keep"),
        (
            {"wieght": 1.0},
            ds.ConfigError,
            r"'channels.wieght': not an option of the 'fbs' per-input channel gate. Did you mean 'weight'",
        ),
        ({"weight": -1.0}, ds.ConfigError, r"weight"),
        ({"blocks": [9]}, ds.ConfigError, r"channels.blocks: 'all', block indices in \[0, 4\)"),
        ({"strategy": "fast"}, ds.ConfigError, r"channels.strategy"),
        ({"exclude": "*"}, ds.ConfigError, r"leave no block to gate"),
    ],
)
def test_bad_options_name_the_field(opts, error, match):
    m = _host()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        ds.sparsify_(m, {"channels": {"gate": "fbs", **opts}})
    assert set(m.state_dict()) == set(before)  # nothing was changed


def test_unknown_gate_suggests_fbs():
    with pytest.raises(ds.ConfigError, match=r"unknown per-input channel gate 'fbz'.*Did you mean 'fbs'"):
        gate_channels_(_host(), gate="fbz")
    with pytest.raises(ds.ConfigError, match=r"'channels'.*unknown gate 'fbz'.*Did you mean 'fbs'"):
        ds.sparsify_(_host(), {"channels": {"gate": "fbz"}})


def test_unsupported_models_and_blocks_are_named():
    vit = timm.create_model("test_vit", pretrained=False)
    with pytest.raises(ds.UnsupportedModuleError, match=r"VisionTransformer.*ResNet BasicBlock/Bottleneck"):
        ds.sparsify_(vit, {"channels": {"gate": "fbs"}})
    aa = timm.create_model("resnet10t", pretrained=False, aa_layer=torch.nn.AvgPool2d)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'layer2.0'.*anti-aliasing"):
        gate_channels_(aa)
    m = _gated()
    with pytest.raises(ds.UnsupportedModuleError, match="already has per-input channel gates"):
        gate_channels_(m, blocks=[0])


def test_deepcopy_after_training():
    import copy

    m = _gated().train()
    m(_x(2)).sum().backward()
    copy.deepcopy(m)

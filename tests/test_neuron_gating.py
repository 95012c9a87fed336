"""Per-input MLP neuron gates (cats, dejavu): exact fast paths, batching, calibration, knob, predictor, saving."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynsparse as ds
from dynsparse.errors import ConfigError, GateError, UnsupportedModuleError
from dynsparse.gates.neuron_gates import CatsGate, DejaVuGate
from dynsparse.layers.neuron_gating import (
    NEURON_GATES,
    NeuronGated,
    calibrate_neurons_,
    gate_neurons_,
    neuron_spec,
    set_strategy_,
    train_predictors_,
)

HOSTS = {
    "mlp": lambda: Mlp(12, 40),
    "swiglu": lambda: SwiGLU(12, 40),
    "glu": lambda: GluMlp(12, 80, act_layer=nn.SiLU),
    "glu_first": lambda: GluMlp(12, 80, act_layer=nn.GELU, gate_last=False),
}
ARCH = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5),
}


def _gated(host: str, gate: str, keep: float = 0.5, **kw) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(HOSTS[host]()).double().eval()
    gate_neurons_(m, gate, keep=keep, **kw)
    if gate == "cats":
        calibrate_neurons_(m, [torch.randn(4, 9, 12, dtype=torch.float64)])
    return m


def _run(m, x, strategy):
    set_strategy_(m, strategy)
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("gate", NEURON_GATES.names())
@pytest.mark.parametrize("shape", [(1, 12), (1, 1, 12), (3, 1, 12), (2, 9, 12)])
def test_gathered_equals_masked_on_the_same_decisions(host, gate, shape):
    m = _gated(host, gate)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _run(m, x, "mask")
    for strategy in ("gather", "union", "auto"):
        out = _run(m, x, strategy)
        diff = (out - ref).abs().max().item()
        assert torch.allclose(out, ref, atol=1e-12, rtol=0), f"{strategy}: max-abs diff {diff:.3g}"


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("gate,per", [("cats", "token"), ("dejavu", "token"), ("dejavu", "input")])
def test_batch_equals_one_by_one_and_decisions_differ(host, gate, per):
    m = _gated(host, gate, per=per)
    x = torch.randn(5, 9 if per == "input" else 1, 12, dtype=torch.float64)
    batch = _run(m, x, "auto")
    single = torch.cat([_run(m, x[i : i + 1], "auto") for i in range(len(x))])
    torch.testing.assert_close(batch, single, atol=1e-12, rtol=0)
    mlp = m[0]
    with torch.no_grad():
        keep = mlp.neurons(mlp.gate_activation(x.reshape(-1, 12))) if gate == "cats" else mlp.neurons(x)
    assert not bool((keep == keep[:1]).all())  # inputs keep different neurons


def test_keep_one_is_the_host():
    for gate in NEURON_GATES.names():
        m = _gated("swiglu", gate, keep=1.0)
        host = copy.deepcopy(m)
        host[0] = SwiGLU(12, 40).double()
        host[0].load_state_dict({k: v for k, v in m[0].state_dict().items() if not k.startswith("neurons.")})
        x = torch.randn(3, 4, 12, dtype=torch.float64)
        torch.testing.assert_close(_run(m, x, "auto"), host(x).detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.7, 0.9])
def test_cats_calibration_reaches_the_target_on_calibration_data(keep):
    torch.manual_seed(0)
    m = nn.Sequential(SwiGLU(16, 64)).eval()
    gate_neurons_(m, "cats", keep=keep)
    data = [torch.randn(8, 20, 16) for _ in range(3)]
    calibrate_neurons_(m, data)
    mlp = m[0]
    with torch.no_grad():
        kept = torch.cat([mlp.neurons(mlp.gate_activation(x.reshape(-1, 16))).flatten() for x in data]).float().mean()
    assert abs(kept.item() - keep) <= 0.02, f"kept {kept.item():.4f} of the activations, target {keep}"
    assert mlp.neurons.threshold.item() == pytest.approx(mlp.neurons.threshold_at(keep))


def _flops(m, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("gate", NEURON_GATES.names())
def test_knob_is_monotone_in_flops(gate):
    m = _gated("swiglu", gate)
    set_strategy_(m, "gather")
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    flops = []
    for keep in (1.0, 0.8, 0.5, 0.3, 0.1):
        with ds.budget(m, keep):
            flops.append(_flops(m, x))
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1], flops
    assert m[0].neurons.keep == 0.5  # restored


def test_cats_knob_rederives_the_threshold():
    m = _gated("mlp", "cats")
    g = m[0].neurons
    ts = []
    for keep in (0.9, 0.5, 0.1):
        ds.set_budget_(m, keep=keep)
        ts.append(g.threshold.item())
    assert ts == sorted(ts) and ts[0] < ts[-1]
    ds.set_budget_(m, keep=1.0)
    assert g.threshold.item() == 0.0


def test_predictor_learns_a_synthetic_task():
    torch.manual_seed(0)
    m = nn.Sequential(Mlp(16, 64, act_layer=nn.ReLU)).eval()
    gate_neurons_(m, "dejavu", keep=0.5, per="token")
    data = [torch.randn(256, 16) for _ in range(16)]
    test = torch.randn(512, 16)
    with torch.no_grad():
        before = _recall(m, test)
    recall = train_predictors_(m, data, label="positive", epochs=30, lr=1e-2)
    after = _recall(m, test)
    # chance is 0.5; a token with more than k = 32 positive neurons caps the recall below 1
    assert before < 0.6 and after > 0.85 and recall["0"] > 0.85, (before, after, recall)


def _recall(m, x):
    mlp = m[0]
    with torch.no_grad():
        truth = mlp.gate_activation(x) > 0
        pred = mlp.neurons(x)
    return float((pred & truth).sum() / truth.sum())


def test_training_mode_runs_the_masked_path_with_gradients():
    m = _gated("swiglu", "dejavu").train()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    m(x).sum().backward()
    assert m[0].fc1_g.weight.grad is not None and torch.isfinite(m[0].fc1_g.weight.grad).all()


@pytest.mark.parametrize("host", ["mlp", "swiglu"])
@pytest.mark.parametrize("shape", [(1, 1, 12), (2, 9, 12)])
def test_eval_mode_gathered_paths_give_fc2_its_gradient(host, shape):
    """In eval mode with autograd on (importance scores, input attributions) the gathered paths run: ``fc2``'s
    weight must get the gradient of the masked reference, not None (a cached detached transpose)."""
    m = _gated(host, "dejavu")
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for strategy in ("mask", "gather", "auto"):
        set_strategy_(m, strategy)
        m.zero_grad()
        m(x).sum().backward()
        grads[strategy] = m[0].fc2.weight.grad
    assert grads["gather"] is not None and grads["auto"] is not None
    torch.testing.assert_close(grads["gather"], grads["mask"])
    torch.testing.assert_close(grads["auto"], grads["mask"])


def _vit():
    torch.manual_seed(0)
    return timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]).eval()


@pytest.mark.parametrize("gate", NEURON_GATES.names())
def test_convert_save_load_round_trip(tmp_path, gate):
    m = ds.sparsify_(_vit(), {"neurons": {"gate": gate, "keep": 0.5}})
    x = torch.randn(3, 3, 32, 32)
    if gate == "cats":
        calibrate_neurons_(m, [x])
    else:
        train_predictors_(m, [x], epochs=2)
    ds.set_budget_(m, {"blocks.1.mlp.neurons": 0.3})
    small = ds.convert(m, static=False)
    assert small.slice_plan.dynamic["neurons"] == neuron_spec(m)
    ds.save(small, tmp_path / "n.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "n.safetensors")
    assert isinstance(back.blocks[0].mlp, NeuronGated) and back.blocks[1].mlp.neurons.keep == 0.3
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=0, rtol=0)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_static_convert_is_refused():
    m = ds.sparsify_(_vit(), {"neurons": {"gate": "cats", "keep": 0.5}})
    with pytest.raises(ConfigError, match=r"input-dependent gates.*blocks.0.mlp.neurons.*static=False"):
        ds.convert(m)


def test_bad_options_raise_clearly():
    with pytest.raises(ConfigError, match="Did you mean 'cats'"):
        gate_neurons_(_vit(), "cat")
    with pytest.raises(ConfigError, match="Did you mean 'dejavu'"):
        gate_neurons_(_vit(), "dejavus")
    for keep in (0.0, 1.5, True):
        with pytest.raises((ConfigError, GateError), match="keep"):
            ds.sparsify_(_vit(), {"neurons": {"gate": "dejavu", "keep": keep}})
    with pytest.raises(ConfigError, match="per"):
        gate_neurons_(_vit(), "cats", per="input")
    with pytest.raises(ConfigError, match="rank"):
        gate_neurons_(_vit(), "dejavu", rank=0)
    with pytest.raises(ConfigError, match=r"neurons gate 'cats'.*bogus"):
        gate_neurons_(_vit(), "cats", bogus=1)
    with pytest.raises(UnsupportedModuleError, match="no timm Mlp"):
        gate_neurons_(nn.Sequential(nn.Linear(3, 3)), "cats")
    with pytest.raises(ConfigError, match="strategy"):
        set_strategy_(gate_neurons_(_vit(), "cats"), "fast")
    m = gate_neurons_(_vit(), "cats")
    with pytest.raises(GateError, match=r"'blocks.0.mlp'.*not calibrated.*calibrate_neurons_"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedModuleError, match="already"):
        gate_neurons_(m, "cats")
    with pytest.raises(ConfigError, match="no dejavu"):
        train_predictors_(m, [torch.randn(1, 3, 32, 32)])


def test_sparsify_routes_neurons_and_static_gates_still_work():
    m = ds.sparsify_(_vit(), {"neurons": {"gate": "dejavu", "keep": 0.25, "rank": 8}})
    g = m.blocks[2].mlp.neurons
    assert isinstance(g, DejaVuGate) and g.rank == 8 and g.keep == 0.25
    assert ds.get_budget(m)["blocks.2.mlp.neurons"] == 0.25
    static = ds.sparsify_(_vit(), {"neurons": {"gate": "hard_concrete"}})
    assert not any(isinstance(x, (NeuronGated, CatsGate)) for x in static.modules())


def test_unsupported_mlps_are_refused_with_their_name():
    m = nn.Sequential(Mlp(8, 16, norm_layer=nn.LayerNorm), Mlp(8, 16, use_conv=True))
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Mlp\).*hidden norm"):
        gate_neurons_(m, "cats", modules=["0"])
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Mlp\).*convolutional"):
        gate_neurons_(m, "cats", modules=["1"])
    with pytest.raises(ConfigError, match="no module 'nope'"):
        gate_neurons_(m, "cats", modules=["nope"])
    with pytest.raises(ConfigError, match=r"neurons\.keep.*'2'"):
        gate_neurons_(nn.Sequential(Mlp(8, 16)), "cats", keep={"2": 0.5})


def test_listed_modules_honour_include_and_exclude():
    """``modules`` and fqn globs together (``sparsify_``'s top-level globs join a part's own): both must select."""
    m = ds.sparsify_(
        _vit(), {"neurons": {"gate": "cats", "modules": ["blocks.0.mlp", "blocks.1.mlp"]}}, exclude="blocks.1*"
    )
    assert [type(b.mlp).__name__ for b in m.blocks][:2] == ["NeuronGatedMlp", "Mlp"]
    with pytest.raises(UnsupportedModuleError, match="check include / exclude"):
        gate_neurons_(_vit(), "cats", modules=["blocks.1.mlp"], include="blocks.0.*")


@pytest.mark.parametrize("gate", NEURON_GATES.names())
def test_weight_caches_are_rebuilt_after_training_with_a_fused_optimizer(gate):
    """A fused optimizer step changes the weights without bumping their versions: eval must not use old copies."""
    m = _gated("swiglu", gate).float()
    x = torch.randn(1, 1, 12)  # one token: the packed / transposed caches of the single-row paths
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    for _ in range(2):
        _run(m, x, "auto")  # fills the caches
        m.train()
        m(torch.randn(4, 3, 12)).sum().backward()
        opt.step()
        m.eval()
        torch.testing.assert_close(_run(m, x, "auto"), _run(m, x, "mask"), atol=1e-5, rtol=1e-5)

"""The compiled single-token neuron kernel: exact against the PyTorch path, packing cache, guards, fallbacks."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynsparse import kernels
from dynsparse import set_budget_ as ds_set_budget
from dynsparse.errors import DynsparseError, GateError
from dynsparse.layers.neuron_gating import calibrate_neurons_, gate_neurons_, set_strategy_

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no kernels: {kernels.why_unavailable()}")

HOSTS = {
    "mlp": lambda: Mlp(40, 96),
    "mlp_tanh": lambda: Mlp(40, 96, act_layer=lambda: nn.GELU(approximate="tanh")),
    "mlp_relu": lambda: Mlp(40, 96, act_layer=nn.ReLU),
    "swiglu": lambda: SwiGLU(40, 96),
    "glu": lambda: GluMlp(40, 192, act_layer=nn.SiLU),
    "glu_first": lambda: GluMlp(40, 192, act_layer=nn.GELU, gate_last=False),
}


def _fast_vs_masked(m: nn.Sequential, x: torch.Tensor) -> None:
    """The auto (kernel) path under inference mode against the masked reference."""
    set_strategy_(m, "mask")
    with torch.no_grad():
        ref = m(x)
    set_strategy_(m, "auto")
    with torch.inference_mode():
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # fp32, other summation order


def _gated(host: str, gate: str) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(HOSTS[host]()).eval()
    gate_neurons_(m, gate, keep=0.5)
    if gate == "cats":
        calibrate_neurons_(m, [torch.randn(4, 9, 40)])
    return m


def _spy(monkeypatch, fail: bool = False) -> list:
    """Record (or forbid) calls of the kernels: ``"cats"`` for `cats_rows`, else `neuron_rows`' ``has_g``."""
    calls, real_rows, real_cats = [], kernels.neuron_rows, kernels.cats_rows

    def spy_rows(*args, **kwargs):
        if fail:
            raise AssertionError("the kernel ran where it must not")
        calls.append(kwargs.get("has_g"))
        return real_rows(*args, **kwargs)

    def spy_cats(*args, **kwargs):
        if fail:
            raise AssertionError("the kernel ran where it must not")
        calls.append("cats")
        return real_cats(*args, **kwargs)

    monkeypatch.setattr(kernels, "neuron_rows", spy_rows)
    monkeypatch.setattr(kernels, "cats_rows", spy_cats)
    return calls


@needs_kernels
@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("gate", ["cats", "dejavu"])
def test_kernel_equals_the_masked_reference(host, gate, monkeypatch):
    m = _gated(host, gate)
    calls = _spy(monkeypatch)
    for seed in range(3):
        _fast_vs_masked(m, torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(seed)))
    # one kernel call per token: cats thresholds inside cats_rows; dejavu computes the gate inside neuron_rows
    assert calls == ["cats" if gate == "cats" else True] * 3
    # cats on a plain Mlp reads the transposed fc2 (nothing else is gathered); every other case packs its neurons
    assert (m[0]._packed is None) == (gate == "cats" and host.startswith("mlp"))


@needs_kernels
@pytest.mark.parametrize("host", ["mlp", "swiglu"])
def test_cats_kernel_follows_the_knob_and_refuses_an_uncalibrated_gate(host, monkeypatch):
    m = _gated(host, "cats")
    calls = _spy(monkeypatch)
    x = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(5))
    outs = []
    for keep in (1.0, 0.8, 0.3, 0.01):  # keep 1: every neuron (t = -inf), the host's output
        ds_set_budget(m, keep)
        _fast_vs_masked(m, x)
        with torch.inference_mode():
            outs.append(m(x))
    assert calls == ["cats"] * 8
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(outs))  # each knob setting took effect
    with torch.inference_mode():
        ds_set_budget(m, 1.0)
        dense = nn.Sequential(HOSTS[host]())
        dense.load_state_dict({k: v for k, v in m.state_dict().items() if ".neurons." not in k})
        torch.testing.assert_close(m(x), dense.eval()(x), atol=1e-5, rtol=1e-5)
    fresh = nn.Sequential(HOSTS[host]()).eval()
    gate_neurons_(fresh, "cats", keep=0.5)
    with torch.inference_mode(), pytest.raises(GateError, match="gate of '0': the cats threshold is not calibrated"):
        fresh(x)


@needs_kernels
def test_cats_kernel_against_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    wg, wv, w2 = torch.randn(10, 17, generator=g), torch.randn(10, 17, generator=g), torch.randn(6, 10, generator=g)
    bg, bv, x = torch.randn(10, generator=g), torch.randn(10, generator=g), torch.randn(17, generator=g)
    act = torch.nn.functional.gelu(wg @ x + bg)
    a = act.abs().sort().values
    t = float(a[4] + a[5]) / 2  # midway between two values: no neuron within rounding of the threshold
    kept = act.abs() >= t
    owner = type("Owner", (), {})()
    with torch.inference_mode():
        got = kernels.cats_rows(wg, bg, x, t, kernels.pack_neurons(owner, None, wv, w2), has_v=True, b_v=bv, act=2)
        torch.testing.assert_close(got[0], w2 @ (act * (wv @ x + bv) * kept), atol=1e-5, rtol=1e-5)
        got = kernels.cats_rows(wg, None, x, t, w2.t().contiguous(), has_v=False, act=0)  # identity, no bias
        pre = wg @ x
        torch.testing.assert_close(got[0], w2 @ (pre * (pre.abs() >= t)), atol=1e-5, rtol=1e-5)
    with pytest.raises(DynsparseError, match="packed must be \\(10, parts\\)"):
        kernels.cats_rows(wg, bg, x, t, w2, has_v=False)
    with pytest.raises(DynsparseError, match="c_in = 17 values, got 16"):
        kernels.cats_rows(wg, bg, x[:16], t, w2.t().contiguous(), has_v=False)
    with pytest.raises(DynsparseError, match="b_v must have one value per neuron"):
        kernels.cats_rows(wg, bg, x, t, kernels.pack_neurons(owner, None, wv, w2), has_v=True, b_v=bv[:2])
    with pytest.raises(DynsparseError, match="threshold is NaN"):
        kernels.cats_rows(wg, bg, x, float("nan"), w2.t().contiguous(), has_v=False)
    with pytest.raises(DynsparseError, match="act must be one of"):
        kernels.cats_rows(wg, bg, x, t, w2.t().contiguous(), has_v=False, act=7)


@needs_kernels
@pytest.mark.parametrize("host", ["mlp", "mlp_relu", "swiglu"])
def test_cats_kernel_at_keep_1_keeps_nan_activations_like_the_host(host):
    m = _gated(host, "cats")
    ds_set_budget(m, 1.0)
    x = torch.randn(1, 1, 40)
    x[0, 0, 3] = float("nan")
    with torch.inference_mode():
        assert torch.isnan(m(x)).all()  # every neuron sees the NaN, and none is dropped


@needs_kernels
def test_cats_kernel_on_an_mlp_with_one_output():
    torch.manual_seed(0)
    m = nn.Sequential(Mlp(40, 96, out_features=1)).eval()
    gate_neurons_(m, "cats", keep=0.5)
    calibrate_neurons_(m, [torch.randn(4, 9, 40)])
    _fast_vs_masked(m, torch.randn(1, 1, 40))  # the transposed fc2 (96, 1) has row-major strides


@needs_kernels
def test_glu_halves_are_packed_once_not_per_token():
    m = _gated("glu", "cats")
    with torch.inference_mode():
        m(torch.randn(1, 1, 40))
        first = m[0]._packed
        m(torch.randn(1, 1, 40))  # _producers() returns fresh views of fc1.weight: the cache still holds
    assert m[0]._packed is first
    with torch.no_grad():
        m[0].fc1.weight.mul_(2.0)  # an in-place change of the parameter reaches the views' version counter
    _fast_vs_masked(m, torch.randn(1, 1, 40))
    assert m[0]._packed is not first


@needs_kernels
def test_cats_kernel_stays_out_of_training_dropout_and_other_strategies(monkeypatch):
    m = _gated("swiglu", "cats")
    _spy(monkeypatch, fail=True)
    x = torch.randn(1, 1, 40)
    m[0].drop1 = nn.Dropout(0.5).train()  # dropout on its own in training mode: the kernels do not drop
    with torch.inference_mode():
        m(x)
    m[0].drop1 = nn.Dropout(0.0)
    set_strategy_(m, "gather")
    with torch.inference_mode():
        m(x)
    set_strategy_(m, "auto")
    m.train()
    with torch.no_grad():
        m(x)


@needs_kernels
def test_a_new_weight_at_a_reused_address_is_not_mistaken_for_the_old_one():
    m = _gated("swiglu", "dejavu")
    mlp = m[0]
    for i in range(10):  # replaced Parameters: the allocator often hands out the freed address again
        with torch.no_grad():
            mlp.fc1_g.weight = nn.Parameter(torch.randn(96, 40, generator=torch.Generator().manual_seed(i)))
            mlp.fc2.weight = nn.Parameter(torch.randn(40, 96, generator=torch.Generator().manual_seed(100 + i)))
        _fast_vs_masked(m, torch.randn(1, 1, 40))


@needs_kernels
def test_a_weight_replaced_through_data_at_a_reused_address_is_not_mistaken_for_the_old_one():
    m = _gated("swiglu", "dejavu")
    w = m[0].fc2.weight
    for i in range(10):  # ``w.data = ...`` keeps the Parameter (and its version) and may get the freed address back
        _fast_vs_masked(m, torch.randn(1, 1, 40))
        w.data = torch.randn(40, 96, generator=torch.Generator().manual_seed(2 * i))
        w.data = torch.randn(40, 96, generator=torch.Generator().manual_seed(2 * i + 1))
        _fast_vs_masked(m, torch.randn(1, 1, 40))


@pytest.mark.parametrize("gate", ["cats", "dejavu"])
def test_a_model_built_under_inference_mode_runs_and_sees_in_place_changes(gate):
    """Parameters created under ``inference_mode`` are inference tensors: no version counter, so no weight cache
    can be trusted; every strategy must still run and follow an in-place change made under inference mode."""
    with torch.inference_mode():
        m = _gated("swiglu", gate)
        for step in range(2):
            for shape in ((1, 1, 40), (2, 3, 40)):
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(step))
                set_strategy_(m, "mask")
                ref = m(x)
                for strategy in ("auto", "gather", "union"):
                    set_strategy_(m, strategy)
                    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
            m[0].fc2.weight.mul_(2.0)  # unseen by any version counter


@needs_kernels
def test_indices_that_are_not_integer_cpu_tensors_and_unknown_activations_are_refused():
    g = torch.Generator().manual_seed(0)
    wg, w2, x = torch.randn(7, 33, generator=g), torch.randn(5, 7, generator=g), torch.randn(33, generator=g)
    packed = kernels.pack_neurons(type("Owner", (), {})(), wg, None, w2)
    mask = torch.tensor([True, False, True, False, False, False, True])  # a keep mask is not a list of indices
    with torch.inference_mode():
        for idx in (mask, torch.tensor([0.0, 2.0]), torch.tensor([0, 2], device="meta")):
            with pytest.raises(DynsparseError, match="neuron_rows: idx must be an integer CPU tensor"):
                kernels.neuron_rows(packed, x, idx, c_in=33, has_g=True, has_v=False)
        with pytest.raises(DynsparseError, match="neuron_rows: act must be one of"):
            kernels.neuron_rows(packed, x, torch.tensor([0, 2]), c_in=33, has_g=True, has_v=False, act=7)
        got = kernels.neuron_rows(packed, x, torch.tensor([0, 2], dtype=torch.int32), c_in=33, has_g=True, has_v=False)
        torch.testing.assert_close(got[0], w2[:, [0, 2]] @ (wg[[0, 2]] @ x), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_relu_keeps_nan_like_pytorch():
    g = torch.Generator().manual_seed(0)
    wg, w2, x = torch.randn(7, 33, generator=g), torch.randn(5, 7, generator=g), torch.randn(33, generator=g)
    x[0] = float("nan")
    packed = kernels.pack_neurons(type("Owner", (), {})(), wg, None, w2)
    with torch.inference_mode():
        got = kernels.neuron_rows(packed, x, torch.tensor([0, 2]), c_in=33, has_g=True, has_v=False, act=1)
    assert torch.isnan(got).all()  # torch.relu(nan) is nan, not 0


@needs_kernels
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_does_not_record_the_kernel():
    m = _gated("mlp", "cats")
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        traced = torch.jit.trace(m, x, check_trace=False)
        y = torch.randn(1, 1, 40)
        torch.testing.assert_close(traced(y), m(y), atol=2e-6, rtol=1e-5)


@needs_kernels
def test_pack_is_rebuilt_when_a_weight_changes():
    m = _gated("swiglu", "dejavu")
    x = torch.randn(1, 1, 40)
    with torch.inference_mode():
        m(x)
    first = m[0]._packed
    with torch.no_grad():
        m[0].fc2.weight.mul_(2.0)
    _fast_vs_masked(m, x)
    assert m[0]._packed is not first


@needs_kernels
def test_raw_kernel_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    wg, wv, w2 = torch.randn(7, 33, generator=g), torch.randn(7, 33, generator=g), torch.randn(5, 7, generator=g)
    bg, bv, x = torch.randn(7, generator=g), torch.randn(7, generator=g), torch.randn(33, generator=g)
    idx = torch.tensor([0, 3, 6])
    owner = type("Owner", (), {})()
    packed = kernels.pack_neurons(owner, wg, wv, w2)
    assert packed.shape == (7, 33 + 33 + 5)
    h = torch.nn.functional.silu(wg[idx] @ x + bg[idx]) * (wv[idx] @ x + bv[idx])
    want = w2[:, idx] @ h
    with torch.inference_mode():
        got = kernels.neuron_rows(
            packed, x, idx, c_in=33, has_g=True, has_v=True, b_g=bg, b_v=bv, act=kernels.act_code(nn.SiLU())
        )
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(DynsparseError, match="out of range"):
        kernels.neuron_rows(packed, x, torch.tensor([7]), c_in=33, has_g=True, has_v=True)
    with pytest.raises(DynsparseError, match="g_pre"):
        kernels.neuron_rows(packed, x, idx, c_in=33, has_g=False, has_v=True)
    with pytest.raises(DynsparseError, match="x must be a float32 CPU tensor"):
        kernels.neuron_rows(packed, x.double(), idx, c_in=33, has_g=True, has_v=True)
    with pytest.raises(DynsparseError, match="c_in = 33 values, got 32"):
        kernels.neuron_rows(packed, x[:32], idx, c_in=33, has_g=True, has_v=True)
    with pytest.raises(DynsparseError, match="b_g must have one value per neuron"):
        kernels.neuron_rows(packed, x, idx, c_in=33, has_g=True, has_v=True, b_g=bg[:3])
    with pytest.raises(DynsparseError, match="unit column stride"):
        kernels.neuron_rows(packed.t().contiguous().t(), x, idx, c_in=33, has_g=True, has_v=True)


def test_kernels_stay_out_of_autograd_tracing_and_other_dtypes():
    t = torch.randn(3)
    with torch.inference_mode():
        assert kernels.eager_cpu(t, nn.Parameter(torch.randn(2), requires_grad=False))
        assert not kernels.eager_cpu(t.double())
        with FlopCounterMode(display=False):
            assert not kernels.eager_cpu(t)
    with torch.enable_grad():
        assert not kernels.eager_cpu(t)
    assert kernels.act_code(nn.GELU()) == 2 and kernels.act_code(nn.Tanh()) is None


def test_flop_counter_sees_the_sparse_work_not_the_kernel(monkeypatch):
    m = _gated("swiglu", "dejavu")
    x = torch.randn(1, 1, 40)
    _spy(monkeypatch, fail=True)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        out = m(x)
    # more than the predictor (rank 16: 40·16 + 16·96 MACs): the MLP's own work ran in counted PyTorch ops
    assert fc.get_total_flops() >= 2 * (40 * 16 + 16 * 96) + 2 * 3 * 48 * 40
    set_strategy_(m, "mask")
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), atol=2e-6, rtol=1e-5)


def test_unavailable_kernels_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNSPARSE_NO_KERNELS", "1")
    assert kernels._build.__wrapped__() == (None, "DYNSPARSE_NO_KERNELS is set")
    monkeypatch.delenv("DYNSPARSE_NO_KERNELS")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(kernels.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    assert kernels._build.__wrapped__() == (None, "no C compiler found (set CC)")
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    lib, why = kernels._build.__wrapped__()
    assert lib is None and "need AVX2 and FMA" in why and "DEFAULT" in why


def test_the_library_builds_into_the_cache_dir(monkeypatch, tmp_path):
    if kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("DYNSPARSE_CACHE_DIR", str(tmp_path))
    lib, why = kernels._build.__wrapped__()
    assert lib is not None, why
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("dynsparse-") and built[0].suffix == ".so"


def test_a_compiler_command_with_a_launcher_or_arguments_builds(monkeypatch, tmp_path):
    """``CC="ccache gcc"`` (or ``"gcc -pthread"``) is a command, not a path: all of its words run."""
    cc = kernels._compiler()
    if cc is None or shutil.which("env") is None:
        pytest.skip("needs a C compiler and the env command (the launcher this test puts in CC)")
    monkeypatch.setenv("DYNSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"env {shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')}")
    lib, why = kernels._build.__wrapped__()
    assert lib is not None, why

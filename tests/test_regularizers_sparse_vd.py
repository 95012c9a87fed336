"""Tests of sparse variational dropout against Molchanov, Ashukha & Vetrov (2017) and methods.md 2.15 (eq. 14 KL
approximation, local reparameterisation, ``log α > 3`` pruning), re-derived here on tiny tensors.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from _regularizer_helpers import LOG_ALPHAS, _moments_ok, assert_close, f64, paper_kl
from torch import nn

from dynsparse.errors import ConfigError
from dynsparse.regularizers import (
    Conv2dSVDO,
    LinearSVDO,
    kl_approx,
    kl_weight,
    remove_svd_,
    sparse_vd_,
    svd_kl,
    svd_masks,
    svd_sparsity,
)


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------------------------
# Sparse variational dropout: functional core
# ----------------------------------------------------------------------------------------------------------------


def paper_log_alpha(theta: float, log_sigma2: float) -> float:
    return min(8.0, max(-8.0, log_sigma2 - math.log(theta * theta + 1e-8)))


def test_kl_approx_matches_eq_14() -> None:
    la = torch.tensor(LOG_ALPHAS, dtype=torch.float64)
    kl = kl_approx(la)
    assert_close(kl, f64([paper_kl(v) for v in LOG_ALPHAS]), what="KL(log α)")
    assert (kl >= 0).all() and (kl.diff() < 0).all(), "KL is positive and decreasing in log α"
    assert kl[-1] < 1e-3, "KL vanishes for large α"
    # Far outside the clip the softplus form stays finite (log(1 + 1/α) would overflow).
    assert torch.isfinite(kl_approx(torch.tensor([-800.0, 800.0], dtype=torch.float64))).all()


def test_kl_weight_schedule() -> None:
    assert [kl_weight(e) for e in (0, 4, 4.99, 5, 12.5, 20, 100)] == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert kl_weight(6, start=5, end=20) == pytest.approx(1 / 15)
    assert [kl_weight(e, start=3, end=3) for e in (2, 3, 4)] == [0.0, 1.0, 1.0]


def test_linear_svdo_log_alpha_kl_and_eval_mask() -> None:
    layer = LinearSVDO(3, 2, dtype=torch.float64)
    theta = [[0.5, -1e-3, 2.0], [0.0, 0.1, -0.3]]
    log_s2 = [[-10.0, -10.0, 1.0], [-4.0, -3.0, -2.4]]
    with torch.no_grad():
        layer.weight.copy_(f64(theta))
        layer.log_sigma2.copy_(f64(log_s2))
        layer.bias.copy_(f64([0.1, -0.2]))
    expected_la = [
        [paper_log_alpha(t, s) for t, s in zip(rt, rs, strict=True)] for rt, rs in zip(theta, log_s2, strict=True)
    ]
    assert_close(layer.log_alpha, f64(expected_la), what="log α")
    assert expected_la[1][0] == 8.0, "θ = 0 is clipped to log α = 8"
    assert_close(layer.kl(), f64(sum(paper_kl(v) for r in expected_la for v in r)), what="KL sum")
    keep = [[v <= 3.0 for v in r] for r in expected_la]
    assert layer.weight_mask().tolist() == keep
    x = torch.randn(5, 3, dtype=torch.float64)
    pruned = f64(theta) * f64(keep)
    assert_close(layer.eval()(x), x @ pruned.T + layer.bias.detach(), what="eval output")
    assert torch.equal(layer(x), layer(x)), "eval is deterministic"


def test_svdo_threshold_boundary_is_kept() -> None:
    layer = LinearSVDO(2, 1, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.log_sigma2.copy_(f64([[3.0 + math.log1p(1e-8), 3.0 + 1e-6 + math.log1p(1e-8)]]))
    assert layer.weight_mask().tolist() == [[True, False]], "prune where log α > 3, keep log α == 3"


def test_linear_svdo_train_moments_match_local_reparameterisation() -> None:
    torch.manual_seed(0)
    layer = LinearSVDO(4, 3, dtype=torch.float64).train()
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(torch.rand(3, 4, dtype=torch.float64) * 0.5 + 0.05))
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    theta, sigma2, b = layer.weight.detach(), layer.log_sigma2.detach().exp(), layer.bias.detach()
    mean = (x @ theta.T + b)[0]  # γ = Aθ + b
    var = ((x * x) @ sigma2.T)[0] + 1e-8  # δ = A²σ²
    with torch.no_grad():
        out = layer(x.expand(40_000, 4))
    _moments_ok(out, mean, var, "linear")
    # Each sample gets its own noise (local reparameterisation), unlike a shared weight sample.
    assert out[:, 0].unique().numel() > 39_000


def test_conv2d_svdo_train_moments_and_eval() -> None:
    torch.manual_seed(1)
    layer = Conv2dSVDO(2, 3, 3, padding=1, stride=2, dtype=torch.float64).train()
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.log(torch.rand_like(layer.weight) * 0.3 + 0.01))
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    theta, sigma2, b = layer.weight.detach(), layer.log_sigma2.detach().exp(), layer.bias.detach()
    mean = F.conv2d(x, theta, b, stride=2, padding=1)[0].flatten()
    var = F.conv2d(x * x, sigma2, None, stride=2, padding=1)[0].flatten() + 1e-8
    with torch.no_grad():
        out = layer(x.expand(20_000, 2, 5, 5)).flatten(1)
    _moments_ok(out, mean, var, "conv")
    # Eval: deterministic conv with the pruned weights zeroed.
    with torch.no_grad():
        layer.log_sigma2[0] = 10.0  # every weight of output channel 0 pruned
    la = (layer.log_sigma2 - torch.log(layer.weight**2 + 1e-8)).clamp(-8, 8).detach()
    expected = F.conv2d(x, theta * (la <= 3).double(), b, stride=2, padding=1)
    assert_close(layer.eval()(x), expected, what="conv eval")
    assert_close(layer(x)[0, 0], torch.full_like(expected[0, 0], b[0].item()), what="pruned channel = bias")


def _lenet(d_in: int = 32, n_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, n_out)).double()


def test_sparse_vd_keeps_state_dict_and_shares_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    # MultiheadAttention's out_proj is a Linear subclass it reads the weight of directly: not swapped.
    model = nn.ModuleDict({"net": net, "mha": nn.MultiheadAttention(4, 2)})
    keys = set(model.state_dict())
    weights = {k: v for k, v in model.named_parameters()}
    hook_calls = []
    net[3].register_forward_hook(lambda *a: hook_calls.append(1))
    assert sparse_vd_(model) is model
    assert type(net[0]) is Conv2dSVDO and type(net[3]) is LinearSVDO
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(model.state_dict()) - keys == {"net.0.log_sigma2", "net.3.log_sigma2"}
    assert keys <= set(model.state_dict())
    for k, p in model.named_parameters():
        if not k.endswith("log_sigma2"):
            assert p is weights[k], f"{k} must be the same tensor"
    assert (net[0].log_sigma2 == -10).all()
    # A host checkpoint loads (only log_sigma2 missing).
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "log_s" not in k}, False
    )
    assert sorted(missing) == ["net.0.log_sigma2", "net.3.log_sigma2"] and not unexpected
    net.eval()(torch.randn(2, 3, 6, 6))
    assert hook_calls == [1], "forward hooks are kept"


def test_sparse_vd_include_exclude_and_errors() -> None:
    model = _lenet()
    sparse_vd_(model, include="[02]")
    assert [type(m).__name__ for m in model if not isinstance(m, nn.ReLU)] == ["LinearSVDO", "LinearSVDO", "Linear"]
    model = sparse_vd_(_lenet(), exclude=["4"])
    assert type(model[4]) is nn.Linear and type(model[0]) is LinearSVDO
    with pytest.raises(ConfigError, match=r"no nn\.Linear"):
        sparse_vd_(nn.Sequential(nn.ReLU()))
    with pytest.raises(ConfigError, match="root"):
        sparse_vd_(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="include"):
        sparse_vd_(_lenet(), include=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="LinearSVDO"):
        LinearSVDO.from_module(nn.Conv2d(1, 1, 1))


def test_svd_sparsity_masks_and_remove() -> None:
    torch.manual_seed(0)
    model = sparse_vd_(_lenet(8, 2))
    with torch.no_grad():
        for m in model[::2]:  # |θ| >= 0.1: log α = log σ² − log θ² well away from the threshold
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.1, 1.0) * torch.randn_like(m.weight).sign())
        model[0].log_sigma2[:30] = 20.0  # 30 rows x 8 inputs: log α = 8 > 3
        model[2].log_sigma2[:, :50] = 20.0  # half of layer 2
        model[4].log_sigma2.fill_(-30.0)  # log α clipped to -8
    n0, n2, n4 = 800, 5000, 100
    sp = svd_sparsity(model)
    assert sp.layers == pytest.approx({"0": 240 / n0, "2": 2500 / n2, "4": 0.0})
    assert (sp.pruned, sp.total) == (2740, n0 + n2 + n4)
    assert sp.sparsity == pytest.approx(2740 / 5900) and sp.compression == pytest.approx(5900 / 3160)
    expected_kl = sum(kl_approx(m.log_alpha).sum() for m in (model[0], model[2], model[4]))
    assert_close(svd_kl(model), expected_kl, what="svd_kl")
    masks = svd_masks(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    y_eval = model.eval()(x)
    keys = set(model.state_dict())
    assert remove_svd_(model) is model
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert set(model.state_dict()) == {k for k in keys if not k.endswith("log_sigma2")}
    assert_close(model(x), y_eval, what="plain model = sparse-VD eval")
    for fqn, mask in masks.items():
        w = model.get_submodule(fqn).weight
        assert (w[~mask] == 0).all() and int(mask.sum()) == int((w != 0).sum()), fqn
    with pytest.raises(ConfigError, match="sparse_vd_"):
        svd_sparsity(model)
    assert svd_kl(model).item() == 0.0


def test_sparse_vd_reaches_high_sparsity_with_kl() -> None:
    """LeNet-300-100-like MLP on a synthetic task that needs 4 of 32 inputs: the KL term prunes most weights."""
    with one_thread():
        torch.manual_seed(0)
        n, d = 512, 32
        x = torch.randn(n, d, dtype=torch.float64)
        w_true = torch.zeros(d, 3, dtype=torch.float64)
        w_true[:4] = torch.randn(4, 3, dtype=torch.float64) * 2
        y = (x @ w_true).argmax(1)
        model = _lenet(d, 3)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(100):  # pretrain, as the paper does
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        sparse_vd_(model)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        steps = 300
        for step in range(steps):
            idx = torch.randint(0, n, (128,))
            loss = F.cross_entropy(model(x[idx]), y[idx]) + kl_weight(step, 0, steps // 3) * svd_kl(model) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).double().mean().item()
        sp = svd_sparsity(model)
    assert sp.sparsity > 0.9, sp
    assert acc > 0.9, acc
    # the first layer keeps far more weights on the 4 informative inputs than on the 28 others
    per_input = svd_masks(model)["0"].sum(0).double()
    assert per_input[:4].mean() > 3 * per_input[4:].mean(), per_input


def test_hook_handles_survive_remove_svd():
    """A hook registered on a sparse-VD layer can still be removed after `remove_svd_` swapped the layer back."""
    from dynsparse.regularizers.variational import remove_svd_, sparse_vd_

    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    sparse_vd_(m)
    fired = []
    handle = m[0].register_forward_hook(lambda *a: fired.append(1))
    remove_svd_(m)
    assert type(m[0]) is nn.Linear
    handle.remove()
    m(torch.randn(1, 4))
    assert fired == []


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_svdo_float16_keeps_gradients_finite(layer: str) -> None:
    # the 1e-8 under log(θ² + ·) and sqrt(var + ·) vanish in float16: a zero weight or an all-zero input gave nan
    torch.manual_seed(0)
    if layer == "linear":
        m, x = LinearSVDO(4, 3).half().train(), torch.zeros(2, 4, dtype=torch.float16)
    else:
        m, x = Conv2dSVDO(2, 3, 3, padding=1).half().train(), torch.zeros(2, 2, 4, 4, dtype=torch.float16)
    x[1] = 1.0
    with torch.no_grad():
        m.weight.view(-1)[0] = 0.0
    (m(x).sum() + m.kl()).backward()
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), f"{name}.grad has non-finite values"
    assert m.log_alpha.dtype == torch.float16
    assert m.log_alpha.view(-1)[0] == 8.0, "a zero weight has the largest log α"


def test_svdo_float16_kl_sum_does_not_overflow() -> None:
    m = LinearSVDO(300, 100)
    with torch.no_grad():
        m.weight.fill_(1.0)  # log α = -8: 30000 weights of KL ≈ 4.6 each, more than the float16 maximum 65504
    kl = m.half().kl()
    assert torch.isfinite(kl), f"kl() = {kl}"
    assert_close(kl.double(), f64(30000 * paper_kl(-8.0)), atol=0, rtol=1e-3, what="float16 kl")


@pytest.mark.parametrize("kwargs", [{"threshold": True}, {"init_log_sigma2": False}])
def test_svdo_refuses_booleans_for_numbers(kwargs):
    from dynsparse.regularizers.variational import LinearSVDO

    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        LinearSVDO(4, 2, **kwargs)


def test_remove_svd_refuses_a_root_layer_before_changing_it() -> None:
    """The error on a root sparse-VD layer came after its pruned weights had been zeroed: the caller's layer changed
    (its training output too) although the call failed."""
    layer = LinearSVDO(3, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.log_sigma2[0] = 20.0  # log α = 8 > 3: pruned
    before = layer.weight.detach().clone()
    with pytest.raises(ConfigError, match="to_host"):
        remove_svd_(layer)
    assert torch.equal(layer.weight, before)

"""Tests of the regularizers, each against its paper's equations re-derived here on tiny tensors.

* Group lasso / SSL: Wen et al. (2016) and methods.md 2.14: ``λ Σ_g sqrt(‖w_g‖² + eps)``, block soft-thresholding.
* Network slimming: Liu et al. (2017) and methods.md 2.7: ``λ Σ|γ|``, subgradient ``λ·sign(γ)``, global percentile.
* Sparse variational dropout: Molchanov, Ashukha & Vetrov (2017) and methods.md 2.15 (eq. 14 KL approximation,
  local reparameterisation, ``log α > 3`` pruning).
* Expected L0: Louizos, Welling & Kingma (2018) and methods.md 2.17.

The expected values below are computed from the equations directly (per-unit loops, reshapes of the weight
tensors, Python floats), not from ``dynsparse`` helpers.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.errors import ConfigError, GateError
from dynsparse.gates import GATES, make_gate
from dynsparse.layers import GatedMlp
from dynsparse.regularizers import (
    BNScaleL1,
    Conv2dSVDO,
    ExpectedL0,
    GroupLasso,
    LinearSVDO,
    VariationalGate,
    kl_approx,
    kl_weight,
    remove_svd_,
    sparse_vd_,
    svd_kl,
    svd_masks,
    svd_sparsity,
)

# Paper constants, written out here rather than imported.
PAPER_K1, PAPER_K2, PAPER_K3 = 0.63576, 1.87320, 1.48695
HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1

# Gated blocks of timm's test_resnet: gate fqn -> (block, conv producing the channels, BN of the channels).
RESNET_GATES = {
    "layer1.0.act1.gate": ("layer1.0", "conv1", "bn1"),
    "layer2.0.act1.gate": ("layer2.0", "conv1", "bn1"),
    "layer3.0.act1.gate": ("layer3.0", "conv1", "bn1"),
    "layer3.0.act2.gate": ("layer3.0", "conv2", "bn2"),
    "layer4.0.act1.gate": ("layer4.0", "conv1", "bn1"),
}


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-12, rtol: float = 1e-10, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    if not isinstance(expected, Tensor):
        expected = torch.tensor(expected, dtype=actual.dtype)
    expected = expected.to(actual.dtype)
    diff = (actual.detach() - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual.detach(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}"
    )


def f64(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_vit(dims=("neurons", "heads"), gate="fixed", seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).to(dtype).eval()
    return ds.sparsify_(model, {d: gate for d in dims})


def tiny_resnet(gate="fixed", seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ds.sparsify_(model, {"channels": gate})


def tiny_mlp(weight: list, bias: list) -> nn.Module:
    """A gated timm Mlp 2 -> 3 -> 2 with the given fc1 weight and bias, in float64."""
    mlp = GatedMlp.from_module(Mlp(2, 3, 2).double(), gate="fixed")
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        mlp.fc1.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return mlp


# ----------------------------------------------------------------------------------------------------------------
# Group lasso (SSL)
# ----------------------------------------------------------------------------------------------------------------


def vit_group_norms(model: nn.Module) -> dict[str, Tensor]:
    """‖w_g‖₂ per neuron (fc1 row + bias) and per head (its q, k, v rows + biases), from reshapes of the weights."""
    out = {}
    for i, blk in enumerate(model.blocks):
        fc1 = blk.mlp.fc1
        out[f"blocks.{i}.mlp.norm.gate"] = (fc1.weight.pow(2).sum(1) + fc1.bias.pow(2)).sqrt()
        a = blk.attn
        h, hd, c = a.num_heads, a.head_dim, a.qkv.in_features
        sq = a.qkv.weight.view(3, h, hd, c).pow(2).sum((0, 2, 3)) + a.qkv.bias.view(3, h, hd).pow(2).sum((0, 2))
        out[f"blocks.{i}.attn.norm.gate"] = sq.sqrt()
    return out


def test_group_lasso_hand_values_and_prox() -> None:
    # fc1 rows + biases: unit 0 = (3, 4 | 0) -> 5, unit 1 = 0, unit 2 = (2, 1 | 2) -> 3.
    mlp = tiny_mlp([[3.0, 4.0], [0.0, 0.0], [2.0, 1.0]], [0.0, 0.0, 2.0])
    fc2_before = mlp.fc2.weight.detach().clone()
    reg = GroupLasso(mlp, weight=0.5, eps=1e-16)
    assert reg.gate_fqns() == ["norm.gate"]
    assert_close(reg(), f64(0.5 * (5.0 + 1e-8 + 3.0)), what="penalty")
    assert_close(reg.group_norms()["norm.gate"], f64([5.0, 0.0, 3.0]), what="group norms")

    # lr * λ = 1: scales 1 - 1/5 = 0.8, zero stays zero, 1 - 1/3 = 2/3.
    assert reg.prox_step_(lr=2.0) is reg
    assert_close(mlp.fc1.weight, f64([[2.4, 3.2], [0.0, 0.0], [4 / 3, 2 / 3]]), what="prox weight")
    assert_close(mlp.fc1.bias, f64([0.0, 0.0, 4 / 3]), what="prox bias")
    assert torch.equal(mlp.fc2.weight, fc2_before), "the consumer must not change"
    # lr * λ = 2.5: unit 0 norm 4 -> 1 - 2.5/4; unit 2 norm 2 <= 2.5 -> exact zeros.
    reg.prox_step_(lr=5.0)
    assert_close(mlp.fc1.weight, f64([[2.4, 3.2], [0.0, 0.0], [0.0, 0.0]]) * 0.375, what="prox 2")
    assert torch.equal(mlp.fc1.weight[2], torch.zeros(2)) and mlp.fc1.bias[2].item() == 0.0
    assert reg.keep_masks()["norm.gate"].tolist() == [True, False, False]
    reg.prox_step_(lr=100.0)
    assert torch.count_nonzero(mlp.fc1.weight) == 0 and torch.count_nonzero(mlp.fc1.bias) == 0
    assert reg.keep_masks()["norm.gate"].tolist() == [True, False, False], "min_keep=1 keeps one unit"
    assert reg.keep_masks(min_keep=0)["norm.gate"].tolist() == [False, False, False]
    assert reg.keep_masks(min_keep=5)["norm.gate"].tolist() == [True, True, True]
    reg.prox_step_(lr=0.0)  # no-op


def test_group_lasso_gradient_is_the_ssl_subgradient() -> None:
    mlp = tiny_mlp([[3.0, 4.0], [0.0, 0.0], [2.0, 1.0]], [0.0, 0.0, 2.0])
    eps = 1e-6
    GroupLasso(mlp, weight=0.7, eps=eps)().backward()
    norm = torch.tensor([25.0, 0.0, 9.0], dtype=torch.float64).add(eps).sqrt()
    assert_close(mlp.fc1.weight.grad, 0.7 * mlp.fc1.weight.detach() / norm[:, None], what="d/dW")
    assert_close(mlp.fc1.bias.grad, 0.7 * mlp.fc1.bias.detach() / norm, what="d/db")
    assert mlp.fc2.weight.grad is None


def test_group_lasso_penalty_on_vit_neurons_and_heads() -> None:
    model = tiny_vit()
    expected = vit_group_norms(model)
    eps, lam = 1e-10, 3e-3
    reg = GroupLasso(model, weight=lam, eps=eps)
    assert set(reg.gate_fqns()) == set(expected)
    total = sum(torch.sqrt(n.pow(2) + eps).sum() for n in expected.values())
    assert_close(reg(), lam * total, what="vit penalty")
    for fqn, norm in reg.group_norms().items():
        assert_close(norm, expected[fqn], what=fqn)
    heads = GroupLasso(model, dimensions=("heads",), weight=1.0, eps=0.0)
    assert all(".attn." in f for f in heads.gate_fqns()) and len(heads.gate_fqns()) == len(model.blocks)
    assert_close(heads(), sum(v.sum() for k, v in expected.items() if ".attn." in k), what="heads only")


def test_group_lasso_prox_on_heads_matches_closed_form() -> None:
    model = tiny_vit()
    norms = vit_group_norms(model)
    attn = model.blocks[0].attn
    h, hd, c = attn.num_heads, attn.head_dim, attn.qkv.in_features
    w0, b0 = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
    fc1_before = model.blocks[0].mlp.fc1.weight.detach().clone()
    head_norm = norms["blocks.0.attn.norm.gate"]
    t = float(head_norm.detach().mean())  # between the two heads: one is zeroed, one shrunk
    assert head_norm.min() < t < head_norm.max()
    lam = 0.25
    GroupLasso(model, dimensions=("heads",), weight=lam).prox_step_(lr=t / lam)
    scale = torch.clamp(1 - t / head_norm, min=0)
    assert_close(attn.qkv.weight, (w0.view(3, h, hd, c) * scale[None, :, None, None]).view_as(w0), what="qkv W")
    assert_close(attn.qkv.bias, (b0.view(3, h, hd) * scale[None, :, None]).view_as(b0), what="qkv b")
    dead = int(head_norm.argmin())
    assert torch.count_nonzero(attn.qkv.weight.view(3, h, hd, c)[:, dead]) == 0, "exact zeros for the dead head"
    assert torch.equal(model.blocks[0].mlp.fc1.weight, fc1_before), "neurons untouched"


def test_group_lasso_keep_masks_convert_vit() -> None:
    model = tiny_vit(dtype=torch.float32)
    hidden = model.blocks[0].mlp.fc1.out_features
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[:100].zero_()
        model.blocks[0].mlp.fc1.bias[:100].zero_()
        qkv = model.blocks[1].attn.qkv
        w = qkv.weight.view(3, 2, -1, qkv.in_features)
        w[:, 0] = 0
        qkv.bias.view(3, 2, -1)[:, 0] = 0
        model.blocks[2].attn.qkv.weight.zero_()
        model.blocks[2].attn.qkv.bias.zero_()
    masks = GroupLasso(model).keep_masks()
    assert int(masks["blocks.0.mlp.norm.gate"].sum()) == hidden - 100
    assert masks["blocks.1.attn.norm.gate"].tolist() == [False, True]
    assert masks["blocks.2.attn.norm.gate"].tolist() == [True, False], "min_keep keeps one head"
    ds.fix_gates_(model, masks)
    x = torch.randn(2, 3, 32, 32)
    small = ds.convert(model, verify_inputs=x)
    assert small.blocks[0].mlp.fc1.out_features == hidden - 100
    assert small.blocks[1].mlp.fc1.out_features == hidden
    assert [b.attn.num_heads for b in small.blocks[:4]] == [2, 1, 1, 2]
    assert small(x).shape == (2, 5)


def test_group_lasso_prox_then_convert_resnet() -> None:
    model = tiny_resnet(dtype=torch.float32)
    reg = GroupLasso(model, weight=1.0)
    assert set(reg.gate_fqns()) == set(RESNET_GATES)
    for fqn, (blk, conv, _) in RESNET_GATES.items():
        w = model.get_submodule(f"{blk}.{conv}").weight
        assert_close(reg.group_norms()[fqn], w.detach().flatten(1).norm(dim=1), atol=1e-6, rtol=1e-5, what=fqn)
    t = float(torch.cat(list(reg.group_norms().values())).median())
    reg.prox_step_(lr=t)
    masks = reg.keep_masks()
    kept = {fqn: int(m.sum()) for fqn, m in masks.items()}
    assert 0 < sum(kept.values()) < sum(m.numel() for m in masks.values())
    for fqn, (blk, conv, _) in RESNET_GATES.items():
        w = model.get_submodule(f"{blk}.{conv}").weight
        assert torch.equal(w.flatten(1).abs().sum(1) == 0, ~masks[fqn]) or kept[fqn] == 1
    ds.fix_gates_(model, masks)
    small = ds.convert(model, verify_inputs=torch.randn(2, 3, 32, 32))
    for fqn, (blk, conv, bn) in RESNET_GATES.items():
        assert small.get_submodule(f"{blk}.{conv}").out_channels == kept[fqn], fqn
        assert small.get_submodule(f"{blk}.{bn}").num_features == kept[fqn], fqn


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dimensions": ("neuron",)}, "Did you mean 'neurons'"),
        ({"dimensions": ("layers",)}, "unknown dimension"),
        ({"dimensions": ()}, "at least one"),
        ({"weight": -1.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_group_lasso_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GroupLasso(tiny_mlp([[1.0, 0.0]] * 3, [0.0] * 3), **kwargs)


def test_group_lasso_needs_gated_layers_and_valid_calls() -> None:
    with pytest.raises(ConfigError, match="sparsify_"):
        GroupLasso(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="sparsify_"):
        GroupLasso(tiny_vit(dims=("neurons",)), dimensions=("channels",))
    reg = GroupLasso(tiny_mlp([[1.0, 0.0]] * 3, [0.0] * 3))
    with pytest.raises(ConfigError, match="lr"):
        reg.prox_step_(-0.1)
    with pytest.raises(ConfigError, match="threshold"):
        reg.keep_masks(threshold=-1.0)
    with pytest.raises(ConfigError, match="min_keep"):
        reg.keep_masks(min_keep=-1)
    assert "groups=3" in repr(reg)


# ----------------------------------------------------------------------------------------------------------------
# Network slimming (BN scale L1)
# ----------------------------------------------------------------------------------------------------------------


def test_bn_l1_penalty_gated_and_all() -> None:
    model = tiny_resnet()
    lam = 1e-2
    gated = sum(model.get_submodule(f"{b}.{bn}").weight.abs().sum() for b, _, bn in RESNET_GATES.values())
    assert_close(BNScaleL1(model, weight=lam)(), lam * gated, what="gated penalty")
    every = sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert_close(BNScaleL1(model, weight=lam, scope="all")(), lam * every, what="all penalty")
    assert every > gated


@pytest.mark.parametrize("scope", ["gated", "all"])
def test_bn_l1_subgradient_is_added_after_backward(scope: str) -> None:
    model = tiny_resnet()
    lam = 1e-3
    bn = model.layer1[0].bn1
    with torch.no_grad():
        bn.weight[:3] = torch.tensor([0.0, -0.5, 0.25])
    model.train()
    model(torch.randn(4, 3, 32, 32, dtype=torch.float64)).square().mean().backward()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = {id(m): m.weight.grad.clone() for m in norms}
    model.layer4[0].bn1.weight.grad = None  # a gradient not there yet
    slim = BNScaleL1(model, weight=lam, scope=scope)
    assert slim.add_subgradient_() is slim
    in_scope = {id(model.get_submodule(f"{b}.{n}")) for b, _, n in RESNET_GATES.values()}
    for m in norms:
        sign = torch.sign(m.weight.detach())
        if m is model.layer4[0].bn1:
            expected = lam * sign
        elif scope == "all" or id(m) in in_scope:
            expected = before[id(m)] + lam * sign
        else:
            expected = before[id(m)]
        assert_close(m.weight.grad, expected, what=f"grad of BN with {m.num_features} channels")
    assert bn.weight.grad[0] == before[id(bn)][0], "sign(0) = 0: no subgradient at 0"


def test_bn_l1_autograd_matches_subgradient() -> None:
    model = tiny_resnet()
    slim = BNScaleL1(model, weight=0.3)
    slim().backward()
    for b, _, n in RESNET_GATES.values():
        g = model.get_submodule(f"{b}.{n}").weight
        assert_close(g.grad, 0.3 * torch.sign(g.detach()), what=f"{b}.{n}")


def _set_scales(model: nn.Module, values: Tensor) -> dict[str, Tensor]:
    """Give the gated BNs the given |γ| (in gate order, with alternating signs); returns them per gate."""
    out, start = {}, 0
    with torch.no_grad():
        for fqn, (b, _, n) in RESNET_GATES.items():
            w = model.get_submodule(f"{b}.{n}").weight
            v = values[start : start + w.numel()].to(w.dtype)
            signs = torch.where(torch.arange(w.numel()) % 2 == 0, 1.0, -1.0).to(w.dtype)
            w.copy_(v * signs)
            out[fqn] = v
            start += w.numel()
    return out


def test_bn_l1_global_percentile_and_min_keep() -> None:
    model = tiny_resnet()
    total = sum(model.get_submodule(f"{b}.{n}").num_features for b, _, n in RESNET_GATES.values())
    assert total == 272
    g = torch.Generator().manual_seed(0)
    values = (torch.randperm(total, generator=g).double() + 1) / total  # distinct |γ| in (0, 1]
    scales = _set_scales(model, values)
    slim = BNScaleL1(model, weight=1e-4)
    for fqn, s in slim.scales().items():
        assert_close(s, scales[fqn], what=fqn)

    # Global: prune the 136 smallest |γ| of all gated channels; the cut is the 137th smallest value.
    masks = slim.keep_masks(prune_ratio=0.5)
    cut = values.sort().values[135]
    for fqn, m in masks.items():
        assert m.tolist() == (scales[fqn] > cut).tolist(), fqn
    assert sum(int(m.sum()) for m in masks.values()) == 136
    assert slim.keep_masks().keys() == masks.keys()  # default prune_ratio 0.5

    # Threshold form.
    thr = 0.8
    for fqn, m in slim.keep_masks(threshold=thr).items():
        assert m.tolist() == (scales[fqn] > thr).tolist()

    # Layer-wise: each gate prunes floor(n/2) of its own.
    for fqn, m in slim.keep_masks(prune_ratio=0.5, scope="layer").items():
        n = scales[fqn].numel()
        assert int(m.sum()) == n - n // 2
        assert scales[fqn][m].min() > scales[fqn][~m].max()

    # A whole layer below the global cut: min_keep keeps its largest channels only.
    small = values.clone()
    small[32:80] = torch.linspace(1e-6, 1e-5, 48, dtype=torch.float64)  # layer2.0's 48 channels
    scales = _set_scales(model, small)
    masks = slim.keep_masks(prune_ratio=0.5)
    assert int(masks["layer2.0.act1.gate"].sum()) == 1
    assert masks["layer2.0.act1.gate"][-1], "the largest |γ| of the layer is kept"
    assert int(slim.keep_masks(prune_ratio=0.5, min_keep=0)["layer2.0.act1.gate"].sum()) == 0
    assert int(slim.keep_masks(prune_ratio=0.5, min_keep=4)["layer2.0.act1.gate"].sum()) == 4
    assert all(int(m.sum()) == 0 for m in slim.keep_masks(prune_ratio=1.0, min_keep=0).values())
    assert all(m.all() for m in slim.keep_masks(prune_ratio=0.0).values())


def test_bn_l1_masks_convert_resnet() -> None:
    model = tiny_resnet(dtype=torch.float32)
    masks = BNScaleL1(model).keep_masks(prune_ratio=0.6)
    ds.fix_gates_(model, masks)
    small = ds.convert(model, verify_inputs=torch.randn(2, 3, 32, 32))
    for fqn, (b, conv, bn) in RESNET_GATES.items():
        assert small.get_submodule(f"{b}.{conv}").out_channels == int(masks[fqn].sum()) >= 1
        assert small.get_submodule(f"{b}.{bn}").num_features == int(masks[fqn].sum())


def test_bn_l1_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="BatchNorm"):
        BNScaleL1(tiny_vit())
    vit_all = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    slim = BNScaleL1(vit_all, scope="all")
    with pytest.raises(ConfigError, match="no gated layer"):
        slim.keep_masks()
    with pytest.raises(ConfigError, match="scope"):
        BNScaleL1(tiny_resnet(), scope="everything")  # type: ignore[arg-type]
    slim = BNScaleL1(tiny_resnet())
    with pytest.raises(ConfigError, match="not both"):
        slim.keep_masks(0.5, threshold=0.1)
    with pytest.raises(ConfigError, match="prune_ratio"):
        slim.keep_masks(1.5)
    with pytest.raises(ConfigError, match="needs prune_ratio"):
        slim.keep_masks(threshold=0.1, scope="layer")
    with pytest.raises(ConfigError, match="scope"):
        slim.keep_masks(scope="model")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Sparse variational dropout: functional core
# ----------------------------------------------------------------------------------------------------------------


def paper_kl(log_alpha: float) -> float:
    """KL from eq. 14: −KL ≈ k1·σ(k2 + k3·log α) − ½·log(1 + α⁻¹) − k1, in Python floats."""
    sig = 1.0 / (1.0 + math.exp(-(PAPER_K2 + PAPER_K3 * log_alpha)))
    neg_kl = PAPER_K1 * sig - 0.5 * math.log(1.0 + 1.0 / math.exp(log_alpha)) - PAPER_K1
    return -neg_kl


def paper_log_alpha(theta: float, log_sigma2: float) -> float:
    return min(8.0, max(-8.0, log_sigma2 - math.log(theta * theta + 1e-8)))


LOG_ALPHAS = [-8.0, -3.0, -1.0, 0.0, 0.5, 2.0, 3.0, 8.0]


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


def _moments_ok(samples: Tensor, mean: Tensor, var: Tensor, what: str) -> None:
    """Sample mean and variance within 5 standard errors of the closed form (Gaussian output)."""
    n = samples.shape[0]
    m_hat, v_hat = samples.mean(0), samples.var(0)
    assert ((m_hat - mean).abs() <= 5 * (var / n).sqrt()).all(), f"{what} mean {m_hat} vs {mean}"
    rel = (v_hat / var - 1).abs()
    assert (rel <= 5 * math.sqrt(2 / (n - 1))).all(), f"{what} var {v_hat} vs {var} (max rel {rel.max():.3g})"


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


# ----------------------------------------------------------------------------------------------------------------
# Variational gate
# ----------------------------------------------------------------------------------------------------------------


def test_variational_gate_is_registered() -> None:
    assert GATES.get("variational") is VariationalGate
    gate = make_gate("variational", 5, dtype=torch.float64)
    assert type(gate) is VariationalGate and gate.num_units == 5
    assert make_gate({"gate": "variational", "threshold": 2.0}, 3).threshold == 2.0


def test_variational_gate_contract() -> None:
    gate = make_gate("variational", 6).eval()
    assert torch.equal(gate(), torch.ones(6)) and gate.keep_mask().all()
    assert (gate.log_alpha == -8).all()
    for training in (True, False):
        gate.train(training)
        out = gate()
        assert out.shape == (6,) and torch.isfinite(out).all()
        p = gate.penalty()
        assert p.dim() == 0 and torch.isfinite(p) and p >= 0
        q = gate.expected_keep()
        assert q.shape == (6,) and ((q >= 0) & (q <= 1)).all()
        assert gate.keep_mask().dtype == torch.bool and not gate.keep_mask().requires_grad
    gate.train()
    (gate().sum() + gate.penalty()).backward()
    assert torch.isfinite(gate.log_alpha.grad).all() and (gate.log_alpha.grad != 0).all()
    g64 = VariationalGate(3, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (g64(), g64.eval()(), g64.penalty(), g64.expected_keep()))
    assert VariationalGate(3, device="meta").log_alpha.device.type == "meta"
    src = VariationalGate(4)
    with torch.no_grad():
        src.log_alpha.copy_(torch.tensor([-5.0, 4.0, 0.0, 9.0]))
    dst = VariationalGate(4)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.eval()(), src.eval()()) and torch.equal(dst.penalty(), src.penalty())
    assert "num_units=4" in repr(dst)
    for bad in ({"threshold": float("nan")}, {"init_log_alpha": "x"}, {"log_alpha_range": (1.0, -1.0)}):
        with pytest.raises(GateError, match="VariationalGate"):
            VariationalGate(3, **bad)
    with pytest.raises(GateError):
        make_gate("variational", 0)


def test_variational_gate_equations() -> None:
    la = torch.tensor([*LOG_ALPHAS, 3.0 + 1e-6], dtype=torch.float64)
    gate = VariationalGate(la.numel(), dtype=torch.float64)
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    assert_close(gate.penalty(), f64(sum(paper_kl(v) for v in la.tolist())), what="penalty = Σ KL")
    keep = [v <= 3.0 for v in la.tolist()]
    assert gate.keep_mask().tolist() == keep
    assert gate.eval()().tolist() == [float(k) for k in keep]
    assert_close(gate.expected_keep(), 1 / (1 + la.exp()), what="expected_keep = 1/(1+α)")
    assert gate.constrain_() is gate and gate.log_alpha.max() == 8.0


def test_variational_gate_noise_moments() -> None:
    """Training multiplier z = 1 + sqrt(α)·ε: mean 1, variance α, one draw per unit per forward."""
    la = torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64)
    gate = VariationalGate(3, dtype=torch.float64).train()
    with torch.no_grad():
        gate.log_alpha.copy_(la)
    torch.manual_seed(0)
    with torch.no_grad():
        z = torch.stack([gate() for _ in range(20_000)])
    _moments_ok(z, torch.ones(3, dtype=torch.float64), la.exp(), "variational gate")


def test_variational_gate_in_a_model_converts() -> None:
    model = tiny_vit(dims=("neurons",), gate="variational", dtype=torch.float32)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    (model(x).sum() + ds.penalty(model)).backward()
    gate = model.blocks[0].mlp.norm.gate
    assert isinstance(gate, VariationalGate) and torch.isfinite(gate.log_alpha.grad).all()
    with torch.no_grad():
        gate.log_alpha[:50] = 5.0
    ds.fix_gates_(model)
    small = ds.convert(model, verify_inputs=x)
    assert small.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features - 50
    assert small.blocks[1].mlp.fc1.out_features == model.blocks[1].mlp.fc1.out_features


# ----------------------------------------------------------------------------------------------------------------
# Expected L0
# ----------------------------------------------------------------------------------------------------------------


def test_expected_l0_is_normalised_sum_of_gate_penalties() -> None:
    model = tiny_vit(gate="hard_concrete")
    gates = dict(ds.named_gates(model))
    torch.manual_seed(0)
    with torch.no_grad():
        for g in gates.values():
            g.log_alpha.normal_(0.0, 2.0)
    shift = HC_BETA * math.log(-HC_GAMMA / HC_ZETA)
    expected = sum(torch.sigmoid(g.log_alpha.detach() - shift).sum() for g in gates.values())
    units = sum(g.num_units for g in gates.values())
    reg = ExpectedL0(model, weight=0.1)
    assert reg.num_units() == units
    assert_close(reg(), 0.1 * expected / units, what="normalised")
    assert_close(ExpectedL0(model, weight=0.1, normalize=False)(), 0.1 * expected, what="count")
    reg().backward()
    assert all(g.log_alpha.grad is not None for g in gates.values())
    # A frozen gate drops out of the sum and the count.
    first = next(iter(gates))
    ds.fix_gates_(model, {first: torch.ones(gates[first].num_units, dtype=torch.bool)})
    rest = [g for k, g in gates.items() if k != first]
    assert reg.num_units() == units - gates[first].num_units
    assert_close(
        reg(),
        0.1 * sum(torch.sigmoid(g.log_alpha.detach() - shift).sum() for g in rest) / reg.num_units(),
        what="after fix",
    )
    assert "ExpectedL0" in repr(reg)


def test_expected_l0_errors() -> None:
    with pytest.raises(ConfigError, match="HardConcreteGate"):
        ExpectedL0(tiny_vit(gate="fixed"))
    with pytest.raises(ConfigError, match="weight"):
        ExpectedL0(tiny_vit(gate="hard_concrete"), weight=-1.0)
    model = tiny_vit(gate="hard_concrete")
    reg = ExpectedL0(model)
    ds.fix_gates_(model)
    assert reg().item() == 0.0

"""Tests of network slimming (BN scale L1) against Liu et al. (2017) and methods.md 2.7: ``λ Σ|γ|``, subgradient
``λ·sign(γ)``, global percentile.
"""

from __future__ import annotations

import pytest
import torch
from _regularizer_helpers import RESNET_GATES, assert_close, tiny_resnet, tiny_vit
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.regularizers import BNScaleL1

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


def test_bn_l1_scope_all_counts_every_batchnorm_flavour() -> None:
    """scope="all" takes every affine BatchNorm: 1d / 3d / SyncBatchNorm / timm's *Act norms, not only 2d."""
    from timm.layers import BatchNormAct2d, SyncBatchNormAct

    model = nn.ModuleDict(
        {
            "bn1d": nn.BatchNorm1d(3),
            "bn2d": nn.BatchNorm2d(4),
            "bn3d": nn.BatchNorm3d(5),
            "sync": nn.SyncBatchNorm(6),
            "act": BatchNormAct2d(7),
            "sync_act": SyncBatchNormAct(8),
            "no_scale": nn.BatchNorm1d(9, affine=False),
            "other_norm": nn.LayerNorm(10),
        }
    )
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    in_scope = ["bn1d", "bn2d", "bn3d", "sync", "act", "sync_act"]
    slim = BNScaleL1(model, weight=0.1, scope="all")
    expected = 0.1 * sum(model[k].weight.abs().sum() for k in in_scope)
    assert_close(slim(), expected, what="penalty over every BatchNorm flavour")
    assert "norms=6" in repr(slim)
    slim.add_subgradient_()
    for k in in_scope:
        assert_close(model[k].weight.grad, 0.1 * torch.sign(model[k].weight.detach()), what=f"{k} subgradient")
    assert model["other_norm"].weight.grad is None
    only_1d = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    assert BNScaleL1(only_1d, scope="all")().item() > 0  # used to raise "no affine BatchNorm2d"
    with pytest.raises(ConfigError, match="LazyBatchNorm1d is not initialised"):
        BNScaleL1(nn.Sequential(nn.LazyBatchNorm1d()), scope="all")

"""Tests of the group lasso (SSL) regularizer against Wen et al. (2016) and methods.md 2.14:
``λ Σ_g sqrt(‖w_g‖² + eps)`` and block soft-thresholding, re-derived here on tiny tensors.
"""

from __future__ import annotations

import pytest
import torch
from _regularizer_helpers import RESNET_GATES, assert_close, f64, tiny_resnet, tiny_vit
from timm.layers import Mlp
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.layers import GatedMlp
from dynsparse.regularizers import GroupLasso


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


def test_group_lasso_float16_zero_groups_keep_finite_gradients() -> None:
    # eps=1e-16 vanishes in float16: sqrt(0) then gave inf * 0 = nan gradients on every zeroed group
    mlp = GatedMlp.from_module(Mlp(2, 3, 2), gate="fixed").half()
    reg = GroupLasso(mlp, dimensions="neurons", weight=1.0)
    reg.prox_step_(lr=1e4)
    assert (mlp.fc1.weight == 0).all(), "the prox step zeroes every group"
    reg().backward()
    assert torch.isfinite(mlp.fc1.weight.grad).all() and torch.isfinite(mlp.fc1.bias.grad).all()


def test_group_lasso_float16_large_groups_do_not_overflow() -> None:
    mlp = GatedMlp.from_module(Mlp(2, 3, 2), gate="fixed").half()
    with torch.no_grad():
        mlp.fc1.weight.fill_(300.0)  # ‖w_g‖² = 2·300² + b² > 65504, the float16 maximum
    reg = GroupLasso(mlp, dimensions="neurons", weight=1.0)
    assert torch.isfinite(reg()), "the penalty overflowed"
    norms = reg.group_norms()["norm.gate"]
    assert torch.isfinite(norms).all() and norms.min() > 400


def test_group_lasso_reads_the_masked_weight_the_forward_uses() -> None:
    # unstructured masks + group lasso: momentum moves raw weights under the mask, the forward uses weight * mask
    from dynsparse.prune import apply_masks_

    mlp = tiny_mlp([[3.0, 4.0], [1.0, 1.0], [2.0, 1.0]], [0.0, 0.0, 2.0])
    apply_masks_(mlp, {"fc1.weight": torch.tensor([[True, True], [False, False], [True, False]])})
    with torch.no_grad():
        mlp.fc1.weight.copy_(torch.tensor([[3.0, 4.0], [5.0, 5.0], [2.0, 7.0]], dtype=torch.float64))
    reg = GroupLasso(mlp, weight=0.5, eps=0.0)
    # used rows: (3, 4 | 0) -> 5, (0, 0 | 0) -> 0, (2, 0 | 2) -> sqrt(8)
    assert_close(reg.group_norms()["norm.gate"], f64([5.0, 0.0, 8**0.5]), what="group norms")
    assert reg.keep_masks(min_keep=1)["norm.gate"].tolist() == [True, False, True]
    loss = GroupLasso(mlp, weight=0.5, eps=1e-12)()
    assert_close(loss, f64(0.5 * (5.0 + 1e-6 + 8**0.5)), what="penalty", atol=1e-9)
    loss.backward()
    g = mlp.fc1.weight.grad
    assert (g[~mlp.fc1.weight_mask.bool()] == 0).all(), "no penalty gradient on masked raw weights"
    assert_close(g[0], f64([0.5 * 3 / 5, 0.5 * 4 / 5]), what="gradient of an unmasked group")

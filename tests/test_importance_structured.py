"""Tests of the per-unit importances of `dynsparse.importance`, by hand, and of scores -> keep masks ->
``fix_gates_`` -> ``convert`` on tiny timm models.

Per unit: producer-weight norms, Taylor through the gates (methods.md 2.20), activation mean / APoZ (2.21), branch
ablation. Expected values come from explicit formulas, not from ``dynsparse`` helpers. Package convention under
test: higher score = kept.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from _importance_helpers import assert_close, half_sq, no_hooks
from torch import Tensor, nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.importance import (
    IMPORTANCES,
    WEIGHT_IMPORTANCES,
    ActivationImportance,
    Importance,
    LayerImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    keep_masks,
    make_importance,
)
from dynsparse.layers import GatedMlp

RESNET_GATES = {  # gate fqn -> (block, conv producing the channels, BN of the channels)
    "layer1.0.act1.gate": ("layer1.0", "conv1", "bn1"),
    "layer2.0.act1.gate": ("layer2.0", "conv1", "bn1"),
    "layer3.0.act1.gate": ("layer3.0", "conv1", "bn1"),
    "layer3.0.act2.gate": ("layer3.0", "conv2", "bn2"),
    "layer4.0.act1.gate": ("layer4.0", "conv1", "bn1"),
}


def tiny_vit(dims=("neurons", "heads", "layers"), seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).to(dtype).eval()
    return ds.sparsify_(model, {d: "fixed" for d in dims})


def tiny_resnet(dims=("channels", "layers"), seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ds.sparsify_(model, {d: "fixed" for d in dims})


def image_batches(n=2, b=4, dtype=torch.float64, seed=1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g)) for _ in range(n)
    ]


# ------------------------------------------------------------------------------------------------------------------
# Structured importances, by hand
# ------------------------------------------------------------------------------------------------------------------


def gated_mlp(act=nn.GELU, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    mlp = GatedMlp(3, 4, 2, act_layer=act, gate="fixed").double()
    return nn.Sequential(mlp)


def test_magnitude_importance_by_hand() -> None:
    model = gated_mlp()
    fc1 = model[0].fc1
    s1 = MagnitudeImportance()(model)
    assert list(s1) == ["0.norm.gate"]
    assert_close(s1["0.norm.gate"], fc1.weight.abs().sum(1), rtol=1e-6, what="L1 of fc1 rows")
    s2 = MagnitudeImportance(p=2, bias=True)(model)
    assert_close(
        s2["0.norm.gate"], (fc1.weight.pow(2).sum(1) + fc1.bias.pow(2)).sqrt(), rtol=1e-6, what="L2 rows + bias"
    )

    vit = tiny_vit()
    sv = MagnitudeImportance(p=2)(vit)
    a = vit.blocks[1].attn
    h, hd, c = a.num_heads, a.head_dim, a.qkv.in_features
    assert_close(
        sv["blocks.1.attn.norm.gate"],
        a.qkv.weight.view(3, h, hd, c).pow(2).sum((0, 2, 3)).sqrt(),
        rtol=1e-6,
        what="heads",
    )
    assert not any(k.endswith("drop_path1.gate") for k in sv)  # layers gates have no producer weights

    rn = tiny_resnet()
    sr = MagnitudeImportance()(rn)
    assert set(sr) == set(RESNET_GATES)
    for fqn, (blk, conv, _) in RESNET_GATES.items():
        w = rn.get_submodule(f"{blk}.{conv}").weight
        assert_close(sr[fqn], w.abs().sum((1, 2, 3)), rtol=1e-6, what=fqn)
    with pytest.raises(ConfigError, match="not supported"):
        MagnitudeImportance(dimensions=("layers",))


def mlp_gate_grad(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """Manual ``∂L/∂z`` of ``L = mean_i ½‖fc2(a_i ⊙ z) − t_i‖²`` at ``z = 1``: ``Σ_i (r_i/B)ᵀ W2[:, j] a_ij``."""
    mlp = model[0]
    a = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).detach()
    y = F.linear(a, mlp.fc2.weight, mlp.fc2.bias).detach()
    r = (y - t) / len(x)
    return ((r @ mlp.fc2.weight.detach()) * a).sum(0)


def test_taylor_importance_first_order_by_hand() -> None:
    model = gated_mlp()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64))
        for _ in range(3)
    ]
    expected = sum(mlp_gate_grad(model, x, t) ** 2 for x, t in data) / 3
    s = TaylorImportance(half_sq)(model, data)
    assert_close(s["0.norm.gate"], expected, rtol=1e-5, atol=1e-9, what="(∂L/∂z)² averaged")
    assert no_hooks(model) and all(p.grad is None for p in model.parameters())

    # a closed unit scores 0 (z = 0)
    ds.fix_gates_(model, {"0.norm.gate": torch.tensor([True, False, True, True])})
    assert float(TaylorImportance(half_sq)(model, data)["0.norm.gate"][1]) == 0.0


def test_taylor_importance_second_order_matches_explicit_hessian() -> None:
    model = gated_mlp()
    mlp = model[0]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    a = F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).detach()

    def loss_of(z: Tensor) -> Tensor:
        return half_sq(F.linear(a * z, mlp.fc2.weight.detach(), mlp.fc2.bias.detach()), t)

    z = torch.ones(4, dtype=torch.float64)
    grad = torch.autograd.functional.jacobian(loss_of, z)
    hess = torch.autograd.functional.hessian(loss_of, z)
    expected = (z * grad - 0.5 * z * (hess @ z)) ** 2
    s = TaylorImportance(half_sq, order=2)(model, [(x, t)])
    assert_close(s["0.norm.gate"], expected, rtol=1e-5, atol=1e-10, what="second order")
    assert not torch.allclose(s["0.norm.gate"].double(), (z * grad) ** 2)  # the Hessian term matters here


def test_activation_importance_mean_and_apoz_by_hand() -> None:
    model = gated_mlp(act=nn.ReLU)
    mlp = model[0]
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    acts = torch.cat([F.relu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)).reshape(-1, 4) for x in data]).detach()
    mean = ActivationImportance("mean")(model, data)["0.norm.gate"]
    apoz = ActivationImportance("apoz")(model, data)["0.norm.gate"]
    assert_close(mean, acts.abs().mean(0), rtol=1e-6, what="mean activation")
    assert_close(apoz, 1.0 - (acts == 0).double().mean(0), rtol=1e-6, what="1 − APoZ")
    assert no_hooks(model)

    # ResNet: the act1 slot holds the ReLU; the statistic is taken after it, before the gate
    rn = tiny_resnet(dims=("channels",))
    blk = rn.layer1[0]
    seen = []
    h = blk.bn1.register_forward_hook(lambda m, a, out: seen.append(F.relu(out).detach()))
    xs = image_batches(1)
    rn(xs[0][0])
    h.remove()
    s = ActivationImportance("apoz")(rn, xs)["layer1.0.act1.gate"]
    assert_close(s, 1.0 - (seen[0] == 0).double().mean((0, 2, 3)), rtol=1e-6, what="resnet APoZ after ReLU")
    assert float(s.min()) < 1.0
    assert no_hooks(rn)


@pytest.mark.parametrize("act", [nn.GELU, nn.SiLU])
def test_apoz_without_exact_zeros_raises_naming_the_gate(act) -> None:
    model = gated_mlp(act=act)
    data = [torch.randn(4, 5, 3, dtype=torch.float64) for _ in range(2)]
    with pytest.raises(ConfigError, match=rf"gate '0\.norm\.gate'.*{act.__name__}.*ReLU-type"):
        ActivationImportance("apoz")(model, data)
    assert no_hooks(model)
    ActivationImportance("mean")(model, data)  # the mean statistic is fine without zeros


def test_layer_importance_is_the_loss_increase_of_a_closed_branch() -> None:
    vit = tiny_vit(dims=("layers",))
    data = image_batches(2)
    s = LayerImportance()(vit, data)
    assert len(s) == 12 and all(v.shape == (1,) for v in s.values())
    for fqn in ("blocks.0.drop_path1.gate", "blocks.3.drop_path2.gate"):
        closed = ds.fix_gates_(copy.deepcopy(vit), {fqn: torch.tensor([False])})
        with torch.no_grad():
            diff = sum(float(F.cross_entropy(closed(x), y) - F.cross_entropy(vit(x), y)) for x, y in data) / 2
        assert_close(s[fqn], [diff], rtol=1e-5, atol=1e-7, what=fqn)
    assert no_hooks(vit)


def test_structured_scores_leave_the_model_unchanged() -> None:
    rn = tiny_resnet()
    rn.train()
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    data = image_batches(1)
    for imp in (TaylorImportance(train=True), ActivationImportance(), LayerImportance(), RandomImportance(seed=1)):
        out = imp(rn, data)
        assert all(v.device.type == "cpu" and v.dim() == 1 for v in out.values())
    assert all(m.training for m in rn.modules())
    assert all(torch.equal(v, before[k]) for k, v in rn.state_dict().items())
    assert all(p.grad is None for p in rn.parameters()) and no_hooks(rn)


def test_importance_errors_and_registry() -> None:
    plain = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="sparsify_"):
        MagnitudeImportance()(plain)
    with pytest.raises(ConfigError, match="needs data"):
        TaylorImportance()(gated_mlp())
    with pytest.raises(ConfigError, match="order"):
        TaylorImportance(order=3)
    with pytest.raises(ConfigError, match="kind"):
        ActivationImportance(kind="median")
    assert {"magnitude", "random", "taylor", "activation", "apoz", "layer"} <= set(IMPORTANCES.names())
    assert IMPORTANCES.get("apoz")().kind == "apoz"
    assert {"snip", "grasp", "synflow", "wanda", "movement", "obd"} <= set(WEIGHT_IMPORTANCES.names())
    with pytest.raises(ConfigError, match="Did you mean 'taylor'"):
        IMPORTANCES.get("taylr")
    assert isinstance(make_importance({"name": "magnitude", "p": 2}), MagnitudeImportance)
    assert make_importance("random").seed == 0
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_importance({"name": "magnitude", "q": 2})
    r1, r2 = RandomImportance(seed=4)(gated_mlp()), RandomImportance(seed=4)(gated_mlp())
    assert torch.equal(r1["0.norm.gate"], r2["0.norm.gate"])


# ------------------------------------------------------------------------------------------------------------------
# Integration: scores -> keep masks -> fix_gates_ -> convert
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["vit", "resnet"])
@pytest.mark.parametrize("name", ["magnitude", "taylor", "activation", "random"])
def test_scores_to_smaller_timm_model(arch: str, name: str) -> None:
    model = tiny_vit(dims=("neurons", "heads")) if arch == "vit" else tiny_resnet(dims=("channels",))
    data = image_batches(1)
    imp: Importance = IMPORTANCES.get(name)()
    scores = imp(model, data)
    masks = keep_masks(scores, 0.5, scope="layer", round_to=2)
    ds.fix_gates_(model, masks)
    small = ds.convert(model, verify_inputs=data[0][0], atol=1e-8, rtol=1e-8)
    if arch == "vit":
        widths = [b.mlp.fc1.out_features for b in small.blocks]
        assert all(w == 96 for w in widths), widths
    else:
        for fqn, (blk, conv, _) in RESNET_GATES.items():
            n = model.get_submodule(fqn).num_units
            width = small.get_submodule(f"{blk}.{conv}").out_channels
            assert width < n and width % 2 == 0, (fqn, width, n)


def test_layer_gates_close_branches_in_convert() -> None:
    vit = tiny_vit()
    data = image_batches(1)
    scores = {**TaylorImportance()(vit, data), **LayerImportance()(vit, data)}
    masks = keep_masks(scores, 0.25, scope="layer")
    assert sum(int(~masks[k]) for k in masks if "drop_path" in k) == 0  # 0.25 of one unit rounds to 0
    layer_scores = {k: v for k, v in scores.items() if "drop_path" in k}
    masks.update(keep_masks(layer_scores, num_pruned=2))
    ds.fix_gates_(vit, masks)
    small = ds.convert(vit, verify_inputs=data[0][0], atol=1e-8, rtol=1e-8)
    n_params = sum(p.numel() for p in small.parameters())
    assert n_params < sum(p.numel() for p in vit.parameters())

"""Contract tests for every gated layer: lossless swap, state-dict parity, gradients, dtype, refusals."""

from __future__ import annotations

import functools

import pytest
import timm.layers
import torch
from timm.layers.norm_act import GroupNormAct
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

import dynsparse as ds
from dynsparse.errors import UnsupportedModuleError
from dynsparse.layers import (
    GatedAttention,
    GatedBasicBlock,
    GatedBottleneck,
    GatedDepthwiseSeparableConv,
    GatedEdgeResidual,
    GatedGluMlp,
    GatedInvertedResidual,
    GatedMlp,
    GatedSwiGLU,
    GateSlot,
)

SE = functools.partial(SqueezeExcite, rd_ratio=0.25)
GN = functools.partial(GroupNormAct, num_groups=2)

# (id, gated class, host kwargs, input shape)
CASES = [
    ("mlp", GatedMlp, dict(in_features=12, hidden_features=24), (2, 5, 12)),
    ("mlp_conv", GatedMlp, dict(in_features=6, hidden_features=10, use_conv=True), (2, 6, 4, 4)),
    ("glu", GatedGluMlp, dict(in_features=8, hidden_features=16), (2, 3, 8)),
    ("swiglu", GatedSwiGLU, dict(in_features=8, hidden_features=12), (2, 3, 8)),
    ("attn", GatedAttention, dict(dim=16, num_heads=4, qkv_bias=True), (2, 5, 16)),
    ("attn_qknorm", GatedAttention, dict(dim=16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm), (2, 5, 16)),
    ("attn_headdim", GatedAttention, dict(dim=16, num_heads=3, attn_head_dim=5), (2, 5, 16)),
    ("attn_gated", GatedAttention, dict(dim=16, num_heads=4, gated=True), (2, 5, 16)),
    ("basic", GatedBasicBlock, dict(inplanes=8, planes=8), (2, 8, 6, 6)),
    ("bottleneck", GatedBottleneck, dict(inplanes=16, planes=4), (2, 16, 6, 6)),
    ("inverted", GatedInvertedResidual, dict(in_chs=8, out_chs=8, exp_ratio=3.0, se_layer=SE), (2, 8, 6, 6)),
    ("edge", GatedEdgeResidual, dict(in_chs=8, out_chs=8, exp_ratio=2.0, se_layer=SE), (2, 8, 6, 6)),
    ("dsconv", GatedDepthwiseSeparableConv, dict(in_chs=8, out_chs=12, se_layer=SE), (2, 8, 6, 6)),
]
IDS = [c[0] for c in CASES]


def _host(cls, kwargs, dtype=torch.float64):
    torch.manual_seed(0)
    host = cls.host_class(**kwargs).to(dtype)
    # give BN layers non-trivial statistics so eval mode is a real test
    for m in host.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, 0.5, 1.0)  # keep ReLUs alive so gradients are informative
    return host.eval()


@pytest.mark.parametrize("gate", ds.GATES.names())
@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_lossless_swap_float64(name, cls, kwargs, shape, gate):
    host = _host(cls, kwargs)
    gated = cls.from_module(host, gate=gate).eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(gated(x), host(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_constructor_and_state_dict_parity(name, cls, kwargs, shape):
    host = _host(cls, kwargs, dtype=torch.float32)
    torch.manual_seed(0)
    built = cls(**kwargs)  # same constructor arguments as the host
    host_keys, built_keys = set(host.state_dict()), set(built.state_dict())
    new = built_keys - host_keys
    assert host_keys <= built_keys
    assert new and all(".gate." in k for k in new), new
    # a host checkpoint loads; only gate keys are missing
    missing, unexpected = built.load_state_dict(host.state_dict(), strict=False)
    assert set(missing) == new and not unexpected
    assert [n for n, _ in built.named_children()] == [n for n, _ in host.named_children()]
    built.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(built(x), host(x))


@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_every_parameter_gets_finite_gradient(name, cls, kwargs, shape):
    host = _host(cls, kwargs, dtype=torch.float32)
    gated = cls.from_module(host, gate="hard_concrete").train()
    x = torch.randn(shape)
    loss = gated(x).square().mean() + 1e-3 * ds.penalty(gated)
    loss.backward()
    for n, p in gated.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for n, p in gated.named_parameters() if ".gate." in n)


@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_dtype_and_training_flag_kept(name, cls, kwargs, shape):
    host = _host(cls, kwargs, dtype=torch.float64)
    gated = cls.from_module(host)
    for _, slot in gated.gate_slots():
        assert slot.gate.log_alpha.dtype == torch.float64
        assert slot.training is False
    assert gated(torch.randn(shape, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_from_module_shares_parameters_and_keeps_host_intact(name, cls, kwargs, shape):
    host = _host(cls, kwargs)
    before = [type(c) for c in host.children()]
    gated = cls.from_module(host)
    assert [type(c) for c in host.children()] == before  # host unchanged
    host_params = {id(p) for p in host.parameters()}
    assert all(id(p) in host_params for n, p in gated.named_parameters() if ".gate." not in n)
    assert isinstance(gated, cls.host_class)


def _producers_of_unit0(name: str, m: nn.Module) -> list[tuple[str, tuple]]:
    """(parameter name, index) of everything that computes unit 0 of the layer's first gate."""
    if name.startswith("mlp"):
        return [("fc1.weight", (0,)), ("fc1.bias", (0,))]
    if name == "glu":
        h = m.fc2.in_features
        return [("fc1.weight", (0,)), ("fc1.weight", (h,))]
    if name == "swiglu":
        return [("fc1_g.weight", (0,)), ("fc1_x.weight", (0,))]
    if name.startswith("attn"):
        hd, d = m.head_dim, m.attn_dim
        rows = [("qkv.weight", (r,)) for r in [*range(hd), *range(d, d + hd), *range(2 * d, 2 * d + hd)]]
        return rows + ([("gate.weight", (r,)) for r in range(hd)] if m.gate is not None else [])
    if name in ("basic", "bottleneck"):
        return [("conv1.weight", (0,)), ("bn1.weight", (0,)), ("bn1.bias", (0,))]
    if name == "inverted":
        return [("conv_pw.weight", (0,)), ("conv_dw.weight", (0,)), ("bn2.bias", (0,)), ("se.conv_expand.weight", (0,))]
    if name == "edge":
        return [("conv_exp.weight", (0,)), ("bn1.bias", (0,)), ("se.conv_expand.weight", (0,))]
    return [("conv_dw.weight", (0,)), ("bn1.bias", (0,)), ("se.conv_expand.weight", (0,))]


@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize(("name", "cls", "kwargs", "shape"), CASES, ids=IDS)
def test_closed_unit_makes_output_independent_of_its_producers(name, cls, kwargs, shape, closed):
    """The gate sits where removal is exact: a closed unit's producer weights get exactly zero gradient."""
    host = _host(cls, kwargs)
    gated = cls.from_module(host, gate="fixed").eval()
    _, slot = next(iter(gated.gate_slots()))
    slot.gate.mask[0] = not closed
    gated(torch.randn(shape, dtype=torch.float64)).square().sum().backward()
    params = dict(gated.named_parameters())
    grads = torch.stack([params[p].grad[idx].abs().sum() for p, idx in _producers_of_unit0(name, gated)])
    if closed:
        assert torch.all(grads == 0), grads
    else:
        assert torch.all(grads > 0), grads


def test_wrong_host_type_raises_with_fqn():
    with pytest.raises(UnsupportedModuleError, match=r"'blocks\.0\.mlp'.*GluMlp"):
        GatedMlp.from_module(timm.layers.GluMlp(8, 16), fqn="blocks.0.mlp")


@pytest.mark.parametrize(
    ("cls", "host", "match"),
    [
        (GatedMlp, lambda: timm.layers.Mlp(8, 16, norm_layer=nn.LayerNorm), "hidden norm"),
        (GatedAttention, lambda: timm.layers.Attention(16, 4, scale_norm=True, norm_layer=nn.LayerNorm), "scale_norm"),
        (GatedBottleneck, lambda: Bottleneck(16, 4, cardinality=2, base_width=64), "grouped"),
        (GatedDepthwiseSeparableConv, lambda: DepthwiseSeparableConv(8, 8), "skip"),
        (GatedInvertedResidual, lambda: InvertedResidual(8, 8, exp_ratio=4, group_size=4), "grouped"),
    ],
)
def test_unsupported_configurations_are_refused(cls, host, match):
    with pytest.raises(UnsupportedModuleError, match=match):
        cls.from_module(host(), fqn="x")
    with pytest.raises(UnsupportedModuleError):
        cls(**_kwargs_of(host()))  # building it directly is refused too


@pytest.mark.parametrize(
    ("cls", "host", "match"),
    [
        (
            GatedBasicBlock,
            lambda: BasicBlock(8, 8, norm_layer=functools.partial(nn.GroupNorm, 2)),
            "bn1 is a GroupNorm",
        ),
        (
            GatedBottleneck,
            lambda: Bottleneck(16, 4, norm_layer=functools.partial(nn.GroupNorm, 2)),
            "bn1 is a GroupNorm",
        ),
        (GatedInvertedResidual, lambda: InvertedResidual(8, 8, exp_ratio=2.0, norm_layer=GN), "GroupNormAct"),
        (GatedEdgeResidual, lambda: EdgeResidual(8, 8, exp_ratio=2.0, norm_layer=GN), "GroupNormAct"),
        (GatedDepthwiseSeparableConv, lambda: DepthwiseSeparableConv(8, 12, norm_layer=GN), "GroupNormAct"),
    ],
)
def test_norms_that_mix_channels_are_refused(cls, host, match):
    """A GroupNorm on the gated channels (timm ``resnet50_gn``, ``efficientnet_b0_gn``) normalizes over several
    channels: slicing it would silently change the kept ones."""
    with pytest.raises(UnsupportedModuleError, match=rf"'x'.*{match}.*normalizes over several channels"):
        cls.from_module(host(), fqn="x")


def _kwargs_of(m):
    # rebuild the constructor arguments of the refused hosts above
    if isinstance(m, timm.layers.Mlp):
        return dict(in_features=8, hidden_features=16, norm_layer=nn.LayerNorm)
    if isinstance(m, timm.layers.Attention):
        return dict(dim=16, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
    if isinstance(m, Bottleneck):
        return dict(inplanes=16, planes=4, cardinality=2, base_width=64)
    if isinstance(m, DepthwiseSeparableConv):
        return dict(in_chs=8, out_chs=8)
    return dict(in_chs=8, out_chs=8, exp_ratio=4, group_size=4)


def test_gated_class_as_timm_mlp_and_attn_layer():
    model = timm.create_model(
        "test_vit", mlp_layer=functools.partial(GatedMlp, gate="sigmoid"), attn_layer=GatedAttention
    ).eval()
    kinds = {type(g).__name__ for _, g in ds.named_gates(model)}
    assert kinds == {"SigmoidGate", "HardConcreteGate"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_to_host_removes_slots():
    host = _host(GatedBottleneck, dict(inplanes=16, planes=4))
    gated = GatedBottleneck.from_module(host)
    back = gated.to_host()
    assert type(back) is Bottleneck
    assert not any(isinstance(m, GateSlot) for m in back.modules())
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(back(x), host(x))


def test_gate_slot_refuses_stateful_inner_and_wrong_branch_size():
    with pytest.raises(ds.GateError):
        GateSlot(ds.FixedGate(3), dimension="neurons", inner=nn.LayerNorm(3))
    with pytest.raises(ds.GateError):
        GateSlot(ds.FixedGate(2), dimension="layers", unit_size=0)
    with pytest.raises(ds.GateError):
        GateSlot(nn.Identity(), dimension="neurons")


def test_slot_of_heads_expands_units_over_head_dim():
    slot = GateSlot(ds.FixedGate(2, mask=torch.tensor([True, False])), dimension="heads", unit_size=3)
    y = slot(torch.ones(1, 4, 6))
    assert y[0, 0].tolist() == [1, 1, 1, 0, 0, 0]


def test_bottleneck_and_inverted_units_match_convs():
    g = GatedBottleneck(16, 4)
    assert [s.gate.num_units for _, s in g.gate_slots()] == [g.conv1.out_channels, g.conv2.out_channels]
    ir = GatedInvertedResidual(8, 8, exp_ratio=3.0)
    assert [s.gate.num_units for _, s in ir.gate_slots()] == [24]
    edge = GatedEdgeResidual(8, 8, exp_ratio=2.0)
    assert [s.gate.num_units for _, s in edge.gate_slots()] == [16]

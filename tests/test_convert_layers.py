"""Property tests of conversion on single gated layers: random sizes and keep masks, incl. keep-all/one/none."""

from __future__ import annotations

import functools

import pytest
import timm.layers
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual, SqueezeExcite
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

import dynsparse as ds
from dynsparse.layers import (
    GatedAttention,
    GatedBasicBlock,
    GatedBottleneck,
    GatedEdgeResidual,
    GatedGluMlp,
    GatedInvertedResidual,
    GatedMlp,
    GatedSwiGLU,
)

torch.set_num_threads(1)
SE = functools.partial(SqueezeExcite, rd_ratio=0.25)


def _randomize_bn(m: nn.Module, g: torch.Generator) -> None:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.rand(bn.num_features, generator=g) - 0.5)


# name -> (builder(draw) -> (gated layer class, host, input shape))
def _mlp(draw):
    d, h = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    conv = draw(st.booleans())
    shape = (2, d, 3, 3) if conv else (2, 4, d)
    return GatedMlp, timm.layers.Mlp(d, h, use_conv=conv), shape


def _glu(draw):
    d, h = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    return GatedGluMlp, timm.layers.GluMlp(d, 2 * h), (2, 3, d)


def _swiglu(draw):
    d, h = draw(st.integers(1, 8)), draw(st.integers(1, 10))
    return GatedSwiGLU, timm.layers.SwiGLU(d, h), (2, 3, d)


def _attn(draw):
    heads, hd = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    dim = draw(st.integers(1, 12))
    kw = dict(num_heads=heads, attn_head_dim=hd, qkv_bias=draw(st.booleans()), gated=draw(st.booleans()))
    if draw(st.booleans()):
        kw.update(qk_norm=True, norm_layer=nn.LayerNorm)
    return GatedAttention, timm.layers.Attention(dim, **kw), (2, draw(st.integers(1, 6)), dim)


def _basic(draw):
    c = draw(st.integers(1, 8))
    return GatedBasicBlock, BasicBlock(c, c), (2, c, 5, 5)


def _bottleneck(draw):
    planes = draw(st.integers(1, 4))
    return GatedBottleneck, Bottleneck(4 * planes, planes), (2, 4 * planes, 4, 4)


def _inverted(draw):
    c, exp = draw(st.integers(1, 6)), draw(st.sampled_from([1.0, 2.0, 3.0]))
    se = SE if draw(st.booleans()) else None
    return GatedInvertedResidual, InvertedResidual(c, c, exp_ratio=exp, se_layer=se), (2, c, 5, 5)


def _edge(draw):
    c = draw(st.integers(1, 6))
    return GatedEdgeResidual, EdgeResidual(c, c, exp_ratio=2.0, se_layer=SE), (2, c, 5, 5)


BUILDERS = {
    "mlp": _mlp,
    "glu": _glu,
    "swiglu": _swiglu,
    "attn": _attn,
    "basic": _basic,
    "bottleneck": _bottleneck,
    "inverted": _inverted,
    "edge": _edge,
}


@st.composite
def _mask_and_values(draw, n: int):
    kind = draw(st.sampled_from(["all", "one", "none", "random"]))
    if kind == "all":
        mask = [True] * n
    elif kind == "none":
        mask = [False] * n
    elif kind == "one":
        mask = [False] * n
        mask[draw(st.integers(0, n - 1))] = True
    else:
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    scaled = draw(st.booleans())
    values = draw(st.lists(st.floats(0.1, 1.0), min_size=n, max_size=n)) if scaled else [1.0] * n
    return torch.tensor(mask), torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("name", list(BUILDERS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_convert_equals_gated_eval(name, data):
    cls, host, shape = BUILDERS[name](data.draw)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    host = host.double().eval()
    _randomize_bn(host, g)
    gated = cls.from_module(host, gate="fixed").eval()
    masks = {}
    for child, slot in gated.gate_slots():
        mask, values = data.draw(_mask_and_values(slot.gate.num_units))
        slot.gate.mask.copy_(mask)
        slot.gate.values.copy_(values)
        masks[child] = mask
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    ref = gated(x)
    converted = ds.convert(gated)
    # the input model is untouched and still gated
    assert isinstance(gated, cls)
    assert type(converted) is cls.host_class
    torch.testing.assert_close(converted(x), ref, rtol=1e-9, atol=1e-9)
    # plan: JSON round trip, indices, and the parameter count of a fresh host with the plan replayed
    plan = converted.slice_plan
    assert ds.SlicePlan.from_json(plan.to_json()) == plan
    for child, mask in masks.items():
        assert plan.keep(child) == mask.nonzero().flatten().tolist()
    torch.manual_seed(0)
    fresh = ds.apply_plan(type(host)(**_ctor_kwargs(host)).double(), plan)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()
    }
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in fresh.parameters())


def _ctor_kwargs(host: nn.Module) -> dict:
    """Rebuild a host's constructor kwargs from its sizes (enough for the layer types above)."""
    if isinstance(host, timm.layers.Attention):
        return dict(
            dim=host.qkv.in_features,
            num_heads=host.num_heads,
            attn_head_dim=host.head_dim,
            qkv_bias=host.qkv.bias is not None,
            gated=host.gate is not None,
            qk_norm=not isinstance(host.q_norm, nn.Identity),
            norm_layer=None if isinstance(host.q_norm, nn.Identity) else nn.LayerNorm,
        )
    if isinstance(host, timm.layers.SwiGLU):
        return dict(in_features=host.fc1_g.in_features, hidden_features=host.fc2.in_features)
    if isinstance(host, timm.layers.GluMlp):
        return dict(in_features=host.fc1.in_features, hidden_features=host.fc1.out_features)
    if isinstance(host, timm.layers.Mlp):
        conv = isinstance(host.fc1, nn.Conv2d)
        return dict(
            in_features=host.fc1.in_channels if conv else host.fc1.in_features,
            hidden_features=host.fc2.in_channels if conv else host.fc2.in_features,
            use_conv=conv,
        )
    if isinstance(host, Bottleneck):
        return dict(inplanes=host.conv1.in_channels, planes=host.conv1.out_channels)
    if isinstance(host, BasicBlock):
        return dict(inplanes=host.conv1.in_channels, planes=host.conv1.out_channels)
    if isinstance(host, InvertedResidual):
        c = host.conv_pw.in_channels
        return dict(
            in_chs=c,
            out_chs=c,
            exp_ratio=host.conv_dw.out_channels / c,
            se_layer=None if isinstance(host.se, nn.Identity) else SE,
        )
    c = host.conv_exp.in_channels
    return dict(in_chs=c, out_chs=c, exp_ratio=2.0, se_layer=SE)


def test_mlp_param_count_is_analytic():
    gated = GatedMlp.from_module(timm.layers.Mlp(6, 10, out_features=4), gate="fixed")
    gated.norm.gate.mask.copy_(torch.tensor([True, False] * 5))
    c = ds.convert(gated)
    k = 5
    assert sum(p.numel() for p in c.parameters()) == 6 * k + k + k * 4 + 4
    assert c.fc1.out_features == k and c.fc2.in_features == k


def test_keep_none_keeps_one_zero_unit_not_zero_width():
    gated = GatedAttention.from_module(timm.layers.Attention(8, num_heads=2), gate="fixed").eval()
    gated.norm.gate.mask.zero_()
    c = ds.convert(gated)
    assert c.num_heads == 1 and c.proj.in_features == 4
    assert torch.all(c.proj.weight == 0)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(c(x), gated(x))
    assert c.slice_plan.keep("norm") == []


def test_hard_concrete_non_binary_values_are_folded():
    gated = GatedMlp.from_module(timm.layers.Mlp(4, 6), gate="hard_concrete").eval()
    with torch.no_grad():
        gated.norm.gate.log_alpha.copy_(torch.tensor([5.0, 0.3, -0.5, -6.0, 1.0, 0.0]))
    vals = gated.norm.gate.eval_values()
    assert ((vals > 0) & (vals < 1)).any() and (vals == 0).any()
    c = ds.convert(gated)
    x = torch.randn(3, 4)
    torch.testing.assert_close(c(x), gated(x))
    assert c.fc1.out_features == int((vals > 0).sum())


@pytest.mark.parametrize("host_cls", [BasicBlock, Bottleneck])
def test_pooling_anti_aliasing_converts_exactly(host_cls):
    """A stride-2 block with ``aa_layer=nn.AvgPool2d`` (timm ``resnetaa*``): the pooling acts on each channel alone."""
    torch.manual_seed(0)
    c = 4 * host_cls.expansion
    down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
    host = host_cls(c, 4, stride=2, downsample=down, aa_layer=nn.AvgPool2d).double().eval()
    _randomize_bn(host, torch.Generator().manual_seed(1))
    gated = GatedBottleneck.from_module(host) if host_cls is Bottleneck else GatedBasicBlock.from_module(host)
    keep = torch.tensor([True, False, True, False])
    gated = ds.fix_gates_(gated.eval(), {child: keep for child, _ in gated.gate_slots()})
    x = torch.randn(2, c, 6, 6, dtype=torch.float64)
    converted = ds.convert(gated)
    assert isinstance(converted.aa, nn.AvgPool2d) and converted.conv1.out_channels == 2
    torch.testing.assert_close(converted(x), gated(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "host",
    [
        lambda se: InvertedResidual(8, 8, exp_ratio=3.0, se_layer=se),
        lambda se: EdgeResidual(8, 8, exp_ratio=2.0, se_layer=se),
        lambda se: DepthwiseSeparableConv(8, 8, se_layer=se, noskip=True),
    ],
)
@pytest.mark.parametrize("se", [timm.layers.EcaModule, timm.layers.EffectiveSEModule])
def test_unknown_squeeze_excite_is_refused_when_gating_not_at_convert(host, se):
    """An SE the converter cannot slice is refused up front, not after training, when ``convert`` meets it."""
    with pytest.raises(ds.UnsupportedModuleError, match=f"squeeze-excite module {se.__name__} is not known"):
        ds.sparsify_(nn.Sequential(host(se)), {"channels": "fixed"})

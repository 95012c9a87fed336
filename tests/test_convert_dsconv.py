"""Converting DepthwiseSeparableConv channel gates: the gated channels are the block's input channels, so the
converter also slices their producer (the stem of an EfficientNet / MobileNetV3, or the block before)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm.layers import GroupNormAct, freeze_batch_norm_2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from torch import nn

import dynsparse as ds
from dynsparse.convert.producer import input_producers
from dynsparse.flops import CostModel, count_flops
from dynsparse.layers import GatedDepthwiseSeparableConv

torch.set_num_threads(1)

TIMM = [
    ("tf_efficientnet_lite0", {"blocks.0.0.aa": ["conv_stem", "bn1"]}),
    ("efficientnet_b0", {"blocks.0.0.aa": ["conv_stem", "bn1"]}),  # DS block with squeeze-excite
    ("mobilenetv3_small_050", {"blocks.0.0.aa": ["conv_stem", "bn1"]}),  # stride 2, SE with hard-sigmoid
    # every block is a DS conv without skip: each one's producer is the previous block's conv_pw + bn2
    ("lcnet_050", {"blocks.0.0.aa": ["conv_stem", "bn1"], "blocks.1.0.aa": ["blocks.0.0.conv_pw", "blocks.0.0.bn2"]}),
]
KINDS = ["random", "one", "none", "scaled"]


def _randomize_bn(model: nn.Module, g: torch.Generator) -> None:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def _fix(model: nn.Module, kind: str, g: torch.Generator, keep_first: bool = False) -> dict[str, torch.Tensor]:
    """Fix every gate to a mask of ``kind`` (``scaled``: random mask and eval values in (0.1, 1))."""
    masks = {}
    for fqn, gate in ds.named_gates(model):
        n = gate.num_units
        mask = torch.rand(n, generator=g) < 0.5
        if kind == "one":
            mask = torch.arange(n) == int(torch.randint(n, (1,), generator=g))
        elif kind == "none":
            mask = torch.zeros(n, dtype=torch.bool)
        if keep_first:
            mask[0] = True
        masks[fqn] = mask
    ds.fix_gates_(model, masks)
    if kind == "scaled":
        for _, gate in ds.named_gates(model):
            gate.values.copy_(torch.rand(gate.num_units, generator=g) * 0.9 + 0.1)
    return masks


def _gated_timm(name: str, kind: str, seed: int = 0, **fix) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    g = torch.Generator().manual_seed(seed + 1)
    _randomize_bn(model, g)
    ds.sparsify_(model, {"channels": "fixed"})
    _fix(model, kind, g, **fix)
    return model


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "producers"), TIMM, ids=[t[0] for t in TIMM])
def test_timm_models_convert_exactly(name, producers, kind, tmp_path):
    model = _gated_timm(name, kind)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    converted = ds.convert(model, verify_inputs=x, atol=1e-5)
    torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)
    plan = converted.slice_plan
    for fqn, mods in producers.items():
        assert plan.producers[fqn] == mods
    # the stem is sliced with the first DS block's gate
    keep = plan.keep("blocks.0.0.aa")
    assert converted.conv_stem.out_channels == converted.bn1.num_features == max(len(keep), 1)
    assert converted.bn1.running_mean.shape == (max(len(keep), 1),)
    assert not [m for m in converted.modules() if type(m).__module__.startswith("dynsparse")]
    # plan JSON round trip, replay on a fresh host, save / load
    assert ds.SlicePlan.from_json(plan.to_json()) == plan
    fresh = ds.apply_plan(timm.create_model(name, pretrained=False, num_classes=10), plan)
    assert _shapes(fresh) == _shapes(converted)
    path = ds.save(converted, tmp_path / "m.safetensors", arch={"name": name, "kwargs": {"num_classes": 10}})
    loaded = ds.load(path)
    assert loaded.slice_plan == plan
    assert torch.equal(loaded(x), converted(x))


def test_torch_export_of_a_converted_efficientnet():
    converted = ds.convert(_gated_timm("tf_efficientnet_lite0", "random"))
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(converted, (x,))
    torch.testing.assert_close(ep.module()(x), converted(x))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "lcnet_050"])
def test_cost_model_credits_the_producer(name):
    model = _gated_timm(name, "random", keep_first=True)
    x = torch.zeros(1, 3, 32, 32)
    cost = CostModel(model, x)
    converted = ds.convert(model)
    assert cost.total == count_flops(model, x)
    assert cost.fraction() * cost.total == pytest.approx(count_flops(converted, x), rel=1e-6)
    if name == "tf_efficientnet_lite0":  # no squeeze-excite (whose conv_reduce bias the params scope over-counts)
        params = CostModel(model, kind="params")
        assert params.fraction() * params.total == pytest.approx(sum(p.numel() for p in converted.parameters()))


def test_cost_model_of_the_stem_alone():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    x = torch.zeros(1, 3, 32, 32)
    full = count_flops(model, x)
    ds.sparsify_(model, {"channels": "fixed"}, include="blocks.0.*")
    ds.fix_gates_(model, {"blocks.0.0.aa": torch.arange(32) < 8})
    small = ds.convert(model)
    saved = full - count_flops(small, x)
    stem = count_flops(model.conv_stem, torch.zeros(1, 3, 32, 32))
    assert saved > 0.75 * stem  # the stem's cost is part of what the gate saves
    assert CostModel(model, x).fraction() * full == pytest.approx(full - saved, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# A hand-built model: nn.Sequential of a conv stem and DS blocks, with SE and activations in between.


def _hand_built() -> nn.Sequential:
    se = functools.partial(SqueezeExcite, rd_ratio=0.5)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DepthwiseSeparableConv(8, 12, stride=2, se_layer=se),
        nn.Sequential(DepthwiseSeparableConv(12, 16, pw_act=True), nn.Identity()),
        DepthwiseSeparableConv(16, 6, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def test_hand_built_producers_are_found():
    model = _hand_built()
    assert input_producers(model, "3") == ["0", "1"]
    assert input_producers(model, "4.0") == ["3.conv_pw", "3.bn2"]
    assert input_producers(model, "5") == ["4.0.conv_pw", "4.0.bn2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_built_converts_exactly(kind, seed):
    torch.manual_seed(seed)
    model = _hand_built().double().eval()
    g = torch.Generator().manual_seed(seed + 10)
    _randomize_bn(model, g)
    ds.sparsify_(model, {"channels": "fixed"})
    assert sorted(f for f, _ in ds.named_gates(model)) == ["3.aa.gate", "4.0.aa.gate", "5.aa.gate"]
    _fix(model, kind, g)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=g)
    converted = ds.convert(model)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-9, atol=1e-9)
    plan = converted.slice_plan
    keep = plan.keep("3.aa")
    assert converted[0].out_channels == converted[1].num_features == converted[3].conv_dw.in_channels
    assert converted[0].out_channels == max(len(keep), 1)
    torch.manual_seed(seed)
    fresh = ds.apply_plan(_hand_built().double(), ds.SlicePlan.from_json(plan.to_json()))
    assert _shapes(fresh) == _shapes(converted)


def test_plan_without_producers_replays_by_search_and_bad_producers_are_refused():
    model = _gated_timm("lcnet_050", "random", keep_first=True)
    converted = ds.convert(model)
    plan = converted.slice_plan
    bare = ds.SlicePlan(plan.entries, plan.units, plan.dynamic)
    fresh = ds.apply_plan(timm.create_model("lcnet_050", pretrained=False, num_classes=10), bare)
    assert _shapes(fresh) == _shapes(converted)
    wrong = ds.SlicePlan(plan.entries, plan.units, plan.dynamic, {**plan.producers, "blocks.0.0.aa": ["conv_head"]})
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.0\.aa'.*'conv_head'"):
        ds.apply_plan(timm.create_model("lcnet_050", pretrained=False, num_classes=10), wrong)
    with pytest.raises(ds.ConfigError, match="no entry"):
        ds.SlicePlan({}, {}, {}, {"x.aa": ["conv_stem"]})


# ---------------------------------------------------------------------------------------------------------------
# Refusals: the producer's output is read by something else, or there is no producer.


def _skip_then_ds() -> EfficientNet:
    """An EfficientNet whose DS block (no skip, stride 2) follows an InvertedResidual with a skip."""
    torch.manual_seed(0)
    return EfficientNet(decode_arch_def([["ir_r2_k3_s1_e2_c16"], ["ds_r1_k3_s2_c24"]]), num_classes=3).eval()


def test_producer_with_a_skip_is_refused_naming_both_modules():
    model = _skip_then_ds()
    assert model.blocks[0][1].has_skip and isinstance(model.blocks[0][1], InvertedResidual)
    ds.sparsify_(model, {"channels": "fixed"}, include="blocks.1.*")
    ds.fix_gates_(model, {"blocks.1.0.aa": torch.arange(16) < 8})
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.1\.0'.*'blocks\.0\.1'.*skip connection"):
        ds.convert(model)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.1\.0'"):
        ds.make_plan(model)
    # a gate that removes nothing needs no producer: keep-all (scaled or not) converts
    x = torch.randn(2, 3, 32, 32)
    ds.fix_gates_(model, {"blocks.1.0.aa": torch.ones(16, dtype=torch.bool)})
    model.blocks[1][0].aa.gate.values.uniform_(0.2, 1.0)
    torch.testing.assert_close(ds.convert(model)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "fqn", "match"),
    [
        (lambda: DepthwiseSeparableConv(8, 12, stride=2), "aa", "model's input"),
        (lambda: timm.create_model("efficientnet_b0", features_only=True), "blocks.0.0.aa", "EfficientNetFeatures"),
        (lambda: nn.Sequential(nn.GroupNorm(2, 8), DepthwiseSeparableConv(8, 12, stride=2)), "1.aa", "'0'"),
        # the producer is the last block of stage 0, whose output a features_only model also returns
        (
            lambda: timm.create_model("lcnet_050", features_only=True),
            "blocks.1.0.aa",
            r"'blocks\.0'.*MobileNetV3Features also returns",
        ),
        (
            lambda: timm.create_model("mobilenetv1_100", features_only=True),
            "blocks.2.0.aa",
            r"'blocks\.1'.*EfficientNetFeatures also returns",
        ),
    ],
    ids=["root", "features_only", "groupnorm", "features_stage_output", "features_stage_output_effnet"],
)
def test_no_producer_is_refused(build, fqn, match):
    model = build().eval()
    if isinstance(model, DepthwiseSeparableConv):
        model = GatedDepthwiseSeparableConv.from_module(model, gate="fixed")
    else:
        ds.sparsify_(model, {"channels": "fixed"}, include=fqn.rpartition(".")[0] or "*")
    n = dict(ds.named_gates(model))[f"{fqn}.gate"].num_units
    ds.fix_gates_(model, {fqn: torch.arange(n) < n // 2})
    with pytest.raises(ds.UnsupportedModuleError, match=match):
        ds.convert(model)


def test_features_only_converts_inside_a_stage():
    """A features_only model returns stage outputs only: a producer inside one stage is sliced as usual."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv1_100", features_only=True).eval()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    ds.sparsify_(model, {"channels": "fixed"}, include="blocks.2.1")
    n = model.blocks[2][1].aa.gate.num_units
    ds.fix_gates_(model, {"blocks.2.1.aa": torch.arange(n) % 3 != 0})
    x = torch.randn(2, 3, 32, 32)
    converted = ds.convert(model, verify_inputs=x)
    assert converted.blocks[2][0].conv_pw.out_channels < n
    assert [t.shape for t in converted(x)] == [t.shape for t in model(x)]


def _stem_then_ds(frozen: bool = False) -> EfficientNet:
    """A one-block EfficientNet: stem conv + ``bn1`` (optionally frozen), then a DS block without skip."""
    torch.manual_seed(0)
    model = EfficientNet(decode_arch_def([["ds_r1_k3_s2_c16"]]), num_classes=3).eval()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    if frozen:
        model.bn1 = freeze_batch_norm_2d(model.bn1)
    return model


def _ds_after_stem(stem_norm: nn.Module | None = None, frozen: bool = False) -> EfficientNet:
    """`_stem_then_ds` with ``bn1`` optionally replaced, gated on ``blocks.0.0`` with every other channel kept."""
    model = _stem_then_ds(frozen)
    if stem_norm is not None:
        model.bn1 = stem_norm.eval()
    ds.sparsify_(model, {"channels": "fixed"}, include="blocks.0.0")
    ds.fix_gates_(model, {"blocks.0.0.aa": torch.arange(32) % 2 == 0})
    return model


def test_stem_norm_over_several_channels_is_refused_naming_it():
    model = _ds_after_stem(GroupNormAct(32, num_groups=4))
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.0\.0'.*'bn1'.*GroupNormAct"):
        ds.make_plan(model)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.0\.0'.*'bn1'"):
        ds.convert(model)


def test_frozen_stem_norm_converts_exactly():
    model = _ds_after_stem(frozen=True)
    assert ds.make_plan(model).producers == {"blocks.0.0.aa": ["conv_stem", "bn1"]}
    x = torch.randn(2, 3, 32, 32)
    converted = ds.convert(model)
    assert converted.bn1.weight.shape == (16,)
    torch.testing.assert_close(converted.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-5)
    replayed = ds.apply_plan(_stem_then_ds(frozen=True), converted.slice_plan)  # the recorded producers are checked
    assert _shapes(replayed) == _shapes(converted)


def test_plan_version_is_2_only_when_it_needs_producers():
    from dynsparse.convert.plan import SlicePlan

    plain = SlicePlan(entries={"blocks.0.mlp.gate": {"neurons": [0, 2]}})
    with_producers = SlicePlan(
        entries={"blocks.0.0.aa": {"channels": [1]}}, producers={"blocks.0.0.aa": ["conv_stem", "bn1"]}
    )
    assert plain.to_dict()["version"] == 1  # older readers still load it
    assert with_producers.to_dict()["version"] == 2
    for plan in (plain, with_producers):
        assert SlicePlan.from_json(plan.to_json()) == plan
    data = dict(with_producers.to_dict(), version=3)
    with pytest.raises(ds.ConfigError, match=r"unsupported plan version 3 \(this dynsparse reads versions 1, 2"):
        SlicePlan.from_dict(data)

"""Iterative structured pruning with compaction between rounds: a converted model gated, pruned and converted
again carries one plan relative to the original host, so `save` / `load` rebuild it exactly."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import dynsparse as ds
from dynsparse.convert.plan import SlicePlan, compose

torch.set_num_threads(1)
VIT = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=6, num_classes=5),
}
RESNET = {"name": "resnet10t", "kwargs": {"num_classes": 5}}


def _host(arch: dict) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
    g = torch.Generator().manual_seed(1)
    for bn in model.modules():  # fresh BatchNorms are the identity: give the check something to compare
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _round(model: nn.Module, sparsity: dict, static: bool = True) -> nn.Module:
    """Prune ``model`` (converted or not) by magnitude and convert it, checked against the gated model."""
    ds.prune.structured_(model, sparsity, importance="magnitude")
    small = ds.convert(model, verify_inputs=_x(), atol=1e-5, static=static)
    assert ds.verify(model, small, _x(), atol=1e-5) <= 1e-5
    return small


def _fixed(model: nn.Module, spec: dict, closed: list[str] = (), seed: int = 0, static: bool = True) -> nn.Module:
    """Gate ``model`` with fixed gates, close random units (about half) and the ``layers`` gates ``closed``."""
    ds.sparsify_(model, spec)
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if not isinstance(gate, ds.FixedGate):
            continue
        if gate.num_units == 1:
            masks[fqn] = torch.tensor([fqn.removesuffix(".gate") not in closed])
        else:
            masks[fqn] = torch.rand(gate.num_units, generator=g) < 0.6
    ds.fix_gates_(model, masks)
    return ds.convert(model, verify_inputs=_x(), atol=1e-5, static=static)


def _round_trip(small: nn.Module, arch: dict, tmp_path) -> nn.Module:
    """Save and load ``small``; the loaded model has its outputs, tensors and plan."""
    loaded = ds.load(ds.save(small, tmp_path / "small.safetensors", arch=arch))
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), small(_x()), atol=1e-5, rtol=0)
    mine, theirs = small.state_dict(), loaded.state_dict()
    assert list(theirs) == list(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine), [k for k in mine if not torch.equal(theirs[k], mine[k])]
    assert loaded.slice_plan == small.slice_plan
    return loaded


def test_vit_pruned_twice_saves_and_loads(tmp_path):
    first = _round(_host(VIT), {"neurons": 0.5, "heads": 0.34})
    second = _round(first, {"neurons": 0.5, "heads": 0.5})
    plan = second.slice_plan
    assert plan.units["blocks.0.mlp.norm"] == 192 and plan.units["blocks.0.attn.norm"] == 6
    assert len(plan.keep("blocks.0.mlp.norm")) == 48 and len(plan.keep("blocks.0.attn.norm")) == 2
    assert set(plan.keep("blocks.0.mlp.norm")) <= set(first.slice_plan.keep("blocks.0.mlp.norm"))
    assert second.blocks[0].mlp.fc1.out_features == 48 and second.blocks[0].attn.num_heads == 2
    _round_trip(second, VIT, tmp_path)


def test_resnet_channels_pruned_twice_saves_and_loads(tmp_path):
    second = _round(_round(_host(RESNET), {"channels": 0.25}), {"channels": 0.5})
    assert second.slice_plan.units["layer1.0.act1"] == 64
    assert second.layer1[0].conv1.out_channels == len(second.slice_plan.keep("layer1.0.act1")) == 24
    _round_trip(second, RESNET, tmp_path)


def test_vit_branches_removed_in_each_round(tmp_path):
    spec = {"neurons": "fixed", "layers": "fixed"}
    first = _fixed(_host(VIT), spec, closed=["blocks.0.drop_path1"], seed=1)
    assert isinstance(first.blocks[0].attn, ds.ZeroBranch)
    second = _fixed(first, spec, closed=["blocks.1.drop_path2", "blocks.0.drop_path2"], seed=2)
    plan = second.slice_plan
    assert plan.keep("blocks.0.drop_path1") == [] and plan.keep("blocks.1.drop_path2") == []
    assert plan.keep("blocks.0.drop_path2") == [] and plan.keep("blocks.1.drop_path1") == [0]
    _round_trip(second, VIT, tmp_path)


def test_resnet_blocks_removed_in_each_round(tmp_path):
    spec = {"channels": "fixed", "layers": "fixed"}
    first = _fixed(_host(RESNET), spec, closed=["layer2.0.drop_path"], seed=1)
    second = _fixed(first, spec, closed=["layer3.0.drop_path"], seed=2)
    assert second.slice_plan.keep("layer2.0.drop_path") == second.slice_plan.keep("layer3.0.drop_path") == []
    assert second.slice_plan.keep("layer4.0.drop_path") == [0]
    _round_trip(second, RESNET, tmp_path)


def test_second_round_gates_a_dimension_the_first_did_not(tmp_path):
    first = _round(_host(VIT), {"heads": 0.5})
    second = _round(first, {"neurons": 0.25})
    assert second.slice_plan.units["blocks.2.mlp.norm"] == 192
    assert second.slice_plan.keep("blocks.2.attn.norm") == first.slice_plan.keep("blocks.2.attn.norm")
    _round_trip(second, VIT, tmp_path)


def test_three_rounds(tmp_path):
    small = _host(VIT)
    for sparsity in ({"neurons": 0.25}, {"neurons": 0.25, "heads": 0.34}, {"neurons": 0.5, "heads": 0.5}):
        small = _round(small, sparsity)
    assert small.blocks[1].mlp.fc1.out_features == len(small.slice_plan.keep("blocks.1.mlp.norm")) == 54
    assert small.slice_plan.units["blocks.1.mlp.norm"] == 192
    _round_trip(small, VIT, tmp_path)


def test_loaded_model_pruned_again_saves_and_loads(tmp_path):
    first = _round(_host(VIT), {"neurons": 0.5, "heads": 0.5})
    loaded = ds.load(ds.save(first, tmp_path / "first.safetensors", arch=VIT))
    second = _round(loaded, {"neurons": 0.5})
    assert second.slice_plan.units["blocks.0.mlp.norm"] == 192
    (tmp_path / "two").mkdir()
    _round_trip(second, VIT, tmp_path / "two")


def test_plan_replayed_on_a_fresh_host_prunes_again_and_saves(tmp_path):
    """A host rebuilt with ``apply_plan`` + ``load_state_dict`` is the converted model: it carries the plan, so a
    second round composes (it carried none, and ``save`` refused the second plan as relative to the first)."""
    first = _round(_host(VIT), {"neurons": 0.5, "heads": 0.5})
    fresh = ds.apply_plan(timm.create_model(VIT["name"], pretrained=False, **VIT["kwargs"]), first.slice_plan)
    fresh.load_state_dict(first.state_dict())
    assert fresh.slice_plan == first.slice_plan
    second = _round(fresh.eval(), {"neurons": 0.5})
    assert second.slice_plan.units["blocks.0.mlp.norm"] == 192
    _round_trip(second, VIT, tmp_path)


def test_apply_plan_on_a_converted_model_composes():
    """``apply_plan`` on a model that carries a plan leaves the plan of what the model now is, not a stale one."""
    first = _round(_host(VIT), {"neurons": 0.5})
    gated = ds.prune.structured_(copy.deepcopy(first), {"neurons": 0.5}, importance="magnitude")
    replayed = ds.apply_plan(copy.deepcopy(first), ds.make_plan(gated))  # the second plan, relative to ``first``
    assert replayed.slice_plan == ds.convert(gated).slice_plan
    assert replayed.blocks[0].mlp.fc1.out_features == 48


def test_run_time_part_added_in_the_second_round(tmp_path):
    first = _round(_host(VIT), {"neurons": 0.5})
    ds.sparsify_(first, {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    second = _round(first, {"heads": 0.5}, static=False)
    assert set(second.slice_plan.dynamic) == {"tokens"}
    loaded = _round_trip(second, VIT, tmp_path)
    assert type(loaded.blocks[1]) is type(second.blocks[1])


def test_run_time_part_of_the_first_round_kept_in_the_second(tmp_path):
    ds.sparsify_(model := _host(VIT), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    first = _round(model, {"neurons": 0.5}, static=False)
    second = _round(first, {"neurons": 0.5}, static=False)
    assert set(second.slice_plan.dynamic) == {"tokens"}
    assert len(second.slice_plan.keep("blocks.2.mlp.norm")) == 48
    _round_trip(second, VIT, tmp_path)


def test_converted_model_has_no_sparsify_history():
    """The ``sparsify_`` calls describe gates the converted model no longer has (a later save_gated replays them)."""
    first = _round(_host(VIT), {"neurons": 0.5})
    assert "_dynsparse_history" not in first.__dict__
    ds.sparsify_(first, {"neurons": "fixed"})
    assert [c["spec"] for c in first._dynsparse_history] == [{"neurons": "fixed"}]


@pytest.mark.parametrize(
    ("stale", "match"),
    [
        (SlicePlan({"blocks.0.mlp.norm": {"neurons": [0, 1, 2]}}, {"blocks.0.mlp.norm": 192}), r"kept 3 units.* 96 "),
        (SlicePlan({"blocks.0.mlp.norm": {"heads": [0, 1]}}, {"blocks.0.mlp.norm": 6}), r"sliced 'heads'.* 'neurons'"),
    ],
)
def test_plans_that_do_not_compose_are_refused(stale, match):
    first = _round(_host(VIT), {"neurons": 0.5})
    first.slice_plan = stale  # e.g. a plan attached by hand that does not describe this model
    ds.prune.structured_(first, {"neurons": 0.5})
    before = r"convert: the model was converted before.*'blocks\.0\.mlp\.norm'.*"
    with pytest.raises(ds.ConfigError, match=before + match):
        ds.convert(first)


def test_compose_producers_must_agree():
    first = SlicePlan({"b.conv_dw": {"channels": [0, 2]}}, {"b.conv_dw": 4}, producers={"b.conv_dw": ["stem"]})
    second = SlicePlan({"b.conv_dw": {"channels": [1]}}, {"b.conv_dw": 2}, producers={"b.conv_dw": ["other"]})
    with pytest.raises(ds.ConfigError, match=r"'b\.conv_dw': the two conversions slice different producers"):
        compose(first, second)
    second.producers["b.conv_dw"] = ["stem"]
    assert compose(first, second) == SlicePlan(
        {"b.conv_dw": {"channels": [2]}}, {"b.conv_dw": 4}, producers={"b.conv_dw": ["stem"]}
    )


def test_compose_keep_none_stays_keep_none():
    """A keep-none entry converts to one zeroed unit; whatever a second plan keeps of it, the host keeps none."""
    first = SlicePlan({"m.norm": {"neurons": []}, "b.drop_path": {"layers": []}}, {"m.norm": 8, "b.drop_path": 1})
    second = SlicePlan({"m.norm": {"neurons": [0]}, "b.drop_path": {"layers": [0]}}, {"m.norm": 1, "b.drop_path": 1})
    assert compose(first, second).entries == first.entries


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_width_pruned_twice_saves_and_loads(name, tmp_path):
    """The residual-stream width is one gate over the whole model; re-gated on the narrower stream, it composes."""
    pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")
    from test_hf import _build, _inputs, _out, _random_masks

    small, x, widths = _build(name), _inputs(name), []
    for seed in (7, 3):
        ds.sparsify_(small, {"width": "fixed", "heads": "fixed", "neurons": "fixed"})
        ds.fix_gates_(small, _random_masks(small, seed=seed))
        gated, n = small, small.width.gate.num_units
        small = ds.convert(gated)
        with torch.no_grad():
            ref = _out(gated, x)
            ref = ref[..., gated.width.gate.keep_mask()] if ref.shape[-1] == n else ref
            torch.testing.assert_close(_out(small, x), ref, atol=1e-5, rtol=1e-5)
        widths.append(small.get_input_embeddings().weight.shape[1])
    plan = small.slice_plan
    assert plan.units["width"] == 32 and len(plan.keep("width")) == widths[1] < widths[0] < 32
    loaded = ds.load(ds.save(small, tmp_path / "m.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), _out(small, x), atol=1e-5, rtol=0)
    mine, theirs = small.state_dict(), loaded.state_dict()
    assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in mine)


def test_gated_checkpoint_of_a_second_round_loads_and_converts(tmp_path):
    """Fine-tuning between rounds: the re-gated converted model is checkpointed, loaded and converted."""
    first = _round(_host(VIT), {"neurons": 0.5, "heads": 0.5})
    ds.prune.structured_(first, {"neurons": 0.5})
    back, _ = ds.load_gated(ds.save_gated(first, tmp_path / "gated.safetensors", arch=VIT))
    assert back.blocks[0].mlp.fc1.out_features == 96 and back.slice_plan == first.slice_plan
    with torch.no_grad():
        assert torch.equal(back.eval()(_x()), first(_x()))
    _round_trip(ds.convert(back, verify_inputs=_x(), atol=1e-5), VIT, tmp_path)


def test_depthwise_separable_producers_pruned_twice(tmp_path):
    """A gate on a layer's input channels slices its producers in both rounds; the composed plan replays them."""
    arch = {"name": "lcnet_050", "kwargs": {"num_classes": 5}}
    small = _host(arch)
    for sparsity in (0.25, 0.5):
        small = _round(small, {"channels": sparsity})
    assert small.slice_plan.producers["blocks.1.0.aa"] == ["blocks.0.0.conv_pw", "blocks.0.0.bn2"]
    _round_trip(small, arch, tmp_path)

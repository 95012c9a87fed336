"""sparsify_ spec handling, named_gates, fix_gates_, penalty and sparsity_report."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.layers import GateSlot

torch.set_num_threads(1)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"neuron": {"gate": "hard_concrete"}}, r"unknown dimension 'neuron'.*Did you mean 'neurons'"),
        ({"heads": {"gate": "hard_concret"}}, r"unknown gate 'hard_concret'.*'hard_concrete'"),
        ({"heads": {"gate": "sigmoid", "temprature": 2.0}}, r"'heads\.temprature': gate 'sigmoid' has no option"),
        ({"neurons": {"gate": "hard_concrete", "incldue": "blocks.0.*"}}, r"'neurons\.incldue'.*'include'"),
        ({"neurons": {"init_drop": 0.1}}, r"'neurons\.init_drop'.*Did you mean 'init_drop_rate'"),
        ({"neurons": {"gate": "hard_concrete", "beta": "0.5"}}, r"'neurons\.beta' of gate .* must be a num"),
        ({"heads": {"gate": "sigmoid", "init_logit": True}}, r"'heads\.init_logit' .* must be a number, got bool"),
        ({"heads": 3}, r"field 'heads' must be a mapping"),
        ({}, r"non-empty mapping"),
        ({"heads": {"gate": "topk", "include": 5}}, r"heads\.include"),
    ],
)
def test_bad_specs_name_the_field(vit, spec, match):
    with pytest.raises(ds.ConfigError, match=match):
        ds.sparsify_(vit, spec)


def test_bad_gate_option_has_no_per_input_hint(vit):
    # the gate name is right: listing the per-input neuron gates would send the user the wrong way
    with pytest.raises(ds.ConfigError) as info:
        ds.sparsify_(vit, {"neurons": {"gate": "hard_concrete", "init_std": "x"}})
    assert "Per-input" not in str(info.value)


def test_bad_on_unsupported(vit):
    with pytest.raises(ds.ConfigError, match="on_unsupported"):
        ds.sparsify_(vit, {"heads": "hard_concrete"}, on_unsupported="ignore")


def test_string_spec_and_gate_kwargs(vit):
    ds.sparsify_(vit, {"heads": "sigmoid", "neurons": {"gate": "topk", "keep": 0.5}})
    gates = dict(ds.named_gates(vit))
    assert isinstance(gates["blocks.0.attn.norm.gate"], ds.SigmoidGate)
    g = gates["blocks.0.mlp.norm.gate"]
    assert isinstance(g, ds.TopKGate) and g.k == g.num_units // 2


def test_include_exclude_globs(vit):
    ds.sparsify_(
        vit,
        {"neurons": {"gate": "hard_concrete", "include": "blocks.[01].*"}, "heads": "hard_concrete"},
        exclude=["blocks.5.*"],
    )
    fqns = [f for f, _ in ds.named_gates(vit)]
    assert [f for f in fqns if ".mlp." in f] == ["blocks.0.mlp.norm.gate", "blocks.1.mlp.norm.gate"]
    assert [f for f in fqns if ".attn." in f] == [f"blocks.{i}.attn.norm.gate" for i in range(5)]


def test_gating_twice_is_refused_and_plan_does_not_mutate(vit):
    plan = ds.plan_sparsify(vit, {"neurons": "hard_concrete"})
    assert len(plan.targets) == 6 and not list(ds.named_gates(vit))
    ds.sparsify_(vit, {"neurons": "hard_concrete", "layers": "hard_concrete"})
    with pytest.raises(ds.UnsupportedModuleError, match="already gated"):
        ds.sparsify_(vit, {"neurons": "hard_concrete"})
    with pytest.raises(ds.UnsupportedModuleError, match="already hold layer gates"):
        ds.sparsify_(vit, {"layers": "hard_concrete"})
    ds.sparsify_(vit, {"heads": "hard_concrete"})  # another dimension is fine


def test_a_gate_spec_a_layer_cannot_take_fails_before_any_module_changes(vit):
    # test_vit has 2 heads: the neurons part of the call must not be left behind when the heads part is refused
    with pytest.raises(ds.ConfigError, match=r"'heads' \(the 2-unit gate of 'blocks\.0\.attn'\).*k must be"):
        ds.sparsify_(vit, {"neurons": "hard_concrete", "heads": {"gate": "topk", "k": 5}})
    assert not list(ds.named_gates(vit)) and type(vit.blocks[0].mlp) is timm.layers.Mlp
    with pytest.raises(ds.ConfigError, match=r"'layers' \(the 1-unit gate of 'blocks\.0'\)"):
        ds.plan_sparsify(vit, {"layers": {"gate": "topk", "k": 2}})


def test_a_gate_spec_is_checked_at_the_layers_own_size(vit):
    # a fixed mask of the heads' length is a valid spec (it was checked against a 4096-unit gate and refused)
    ds.sparsify_(vit, {"heads": {"gate": "fixed", "mask": [True, False]}})
    assert all(g.keep_mask().tolist() == [True, False] for _, g in ds.named_gates(vit))


@pytest.mark.parametrize(
    "spec",
    [
        {"neurons": "hard_concrete", "tokens": {"gate": "cls_attention", "blocks": [99]}},
        {"heads": "hard_concrete", "layers": "sigmoid", "depth": {"gate": "router", "keep": 2}},
        {"heads": "hard_concrete", "neurons": {"gate": "cats", "keep": 0}},
    ],
)
def test_a_refused_input_dependent_part_leaves_the_model_as_it_was(vit, spec):
    keys = list(vit.state_dict())
    with pytest.raises(ds.DynsparseError):
        ds.sparsify_(vit, spec)  # the static part was installed, then the input-dependent part refused
    assert not list(ds.named_gates(vit)) and list(vit.state_dict()) == keys
    assert type(vit.blocks[0].attn) is timm.layers.Attention and "_dynsparse_history" not in vit.__dict__
    ds.sparsify_(vit, {"heads": "hard_concrete", "layers": "sigmoid"})  # and it can be gated afterwards


def test_a_refused_call_restores_plain_attributes_of_blocks():
    m = timm.create_model("resnet18", pretrained=False).eval()  # drop_path is a plain None attribute
    x = torch.randn(1, 3, 32, 32)
    ref = m(x)
    with pytest.raises(ds.ConfigError, match="keep"):
        ds.sparsify_(m, {"layers": "hard_concrete", "channels": {"gate": "fbs", "keep": 2}})
    assert m.layer1[0].drop_path is None and not list(ds.named_gates(m))
    torch.testing.assert_close(m(x), ref)


def test_static_gates_on_mlps_with_per_input_gates_are_refused_not_skipped(vit):
    ds.sparsify_(vit, {"neurons": {"gate": "cats", "include": "blocks.0.*"}})
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.0\.mlp' \(NeuronGatedMlp\): it is already gated"):
        ds.sparsify_(vit, {"neurons": "hard_concrete"})
    assert not list(ds.named_gates(vit))[1:]  # only the per-input gate of blocks.0
    ds.sparsify_(vit, {"neurons": "hard_concrete"}, on_unsupported="skip")
    assert [f for f, _ in ds.named_gates(vit)][:2] == ["blocks.0.mlp.neurons", "blocks.1.mlp.norm.gate"]


def test_fix_gates_masks_and_errors(vit):
    ds.sparsify_(vit, {"heads": "hard_concrete", "neurons": "hard_concrete"})
    mask = torch.tensor([True, False])
    ds.fix_gates_(vit, {"blocks.0.attn.norm.gate": mask, "blocks.1.attn.norm": mask})  # slot name works too
    gates = dict(ds.named_gates(vit))
    assert isinstance(gates["blocks.0.attn.norm.gate"], ds.FixedGate)
    assert gates["blocks.1.attn.norm.gate"].keep_mask().tolist() == [True, False]
    assert isinstance(gates["blocks.2.attn.norm.gate"], ds.HardConcreteGate)
    assert gates["blocks.0.attn.norm.gate"].training is False
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.atn\.norm\.gate' names no gate.*Did you mean"):
        ds.fix_gates_(vit, {"blocks.0.atn.norm.gate": mask})
    with pytest.raises(ds.GateError, match=r"blocks\.2\.attn\.norm\.gate.*shape \(2,\)"):
        ds.fix_gates_(vit, {"blocks.2.attn.norm.gate": torch.tensor([True, False, True])})
    with pytest.raises(ds.GateError, match="bool"):
        ds.fix_gates_(vit, {"blocks.2.attn.norm.gate": torch.tensor([1, 0])})


def test_fix_gates_copies_the_callers_masks():
    """Two models fixed from one masks dict share no state with each other or with the caller."""
    masks = {"blocks.0.mlp.norm": torch.arange(192) < 96}
    a, b = (ds.sparsify_(timm.create_model("test_vit").eval(), {"neurons": "fixed"}) for _ in range(2))
    ds.fix_gates_(a, masks)
    ds.fix_gates_(b, masks)
    ga, gb = a.blocks[0].mlp.norm.gate, b.blocks[0].mlp.norm.gate
    assert ga.mask is not masks["blocks.0.mlp.norm"]
    assert ga.mask.data_ptr() != gb.mask.data_ptr() != masks["blocks.0.mlp.norm"].data_ptr()
    state = a.state_dict()
    state["blocks.0.mlp.norm.gate.mask"] = torch.ones(192, dtype=torch.bool)
    a.load_state_dict(state)  # resume model a from another checkpoint
    assert int(ga.mask.sum()) == 192
    assert int(gb.mask.sum()) == 96 and int(masks["blocks.0.mlp.norm"].sum()) == 96
    assert ds.convert(b).blocks[0].mlp.fc1.out_features == 96


def test_fix_gates_without_masks_freezes_current_state(vit):
    ds.sparsify_(vit, {"neurons": "hard_concrete"})
    g = vit.blocks[0].mlp.norm.gate
    with torch.no_grad():
        g.log_alpha[:3] = -10.0  # closed
        g.log_alpha[3] = 1.0  # eval value between 0 and 1
    x = torch.randn(1, 3, 32, 32)
    before = vit(x)
    ds.fix_gates_(vit)
    fixed = vit.blocks[0].mlp.norm.gate
    assert isinstance(fixed, ds.FixedGate)
    assert fixed.keep_mask()[:3].tolist() == [False] * 3
    assert 0 < fixed.eval_values()[3] < 1
    torch.testing.assert_close(vit(x), before)


def test_closed_head_equals_zeroed_head_output(vit):
    """Closing a head is the same as zeroing that head's slice of the attention output before proj."""
    ds.sparsify_(vit, {"heads": "fixed"})
    attn = vit.blocks[0].attn
    ds.fix_gates_(vit, {"blocks.0.attn.norm.gate": torch.tensor([False, True])})
    x = torch.randn(2, 5, attn.qkv.in_features)
    captured = {}
    attn.proj.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    attn(x)
    hd = attn.head_dim
    assert torch.all(captured["x"][..., :hd] == 0) and torch.any(captured["x"][..., hd:] != 0)


def test_penalty_sums_gate_penalties(vit):
    assert ds.penalty(vit).item() == 0.0
    ds.sparsify_(vit, {"heads": "hard_concrete", "neurons": "topk"})
    expected = sum(g.penalty() for _, g in ds.named_gates(vit))
    torch.testing.assert_close(ds.penalty(vit), expected)


def test_report_counts_and_flops(vit):
    ds.sparsify_(vit, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
    full = ds.sparsity_report(vit)
    assert full.flops_keep_ratio == pytest.approx(1.0)
    masks = {}
    for fqn, g in ds.named_gates(vit):
        if ".mlp." in fqn:
            masks[fqn] = torch.arange(g.num_units) < g.num_units // 4
        elif ".attn." in fqn:
            masks[fqn] = torch.tensor([True, False])
    masks["blocks.5.drop_path2.gate"] = torch.tensor([False])
    ds.fix_gates_(vit, masks)
    x = torch.zeros(1, 3, 32, 32)
    rep = ds.sparsity_report(vit, x)
    rows = {r.dimension: r for r in rep.rows}
    assert rows["heads"].kept == 6 and rows["heads"].total == 12
    assert rows["neurons"].keep_ratio == pytest.approx(0.25)
    assert rows["layers"].kept == 11
    # analytic FLOPs: attention scales with heads, MLP with neurons, the closed MLP branch costs nothing
    from torch.utils.flop_counter import FlopCounterMode

    from dynsparse.flops import _custom_mapping

    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc:
        vit(x)
    counts = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    attn = sum(counts[f"VisionTransformer.blocks.{i}.attn"] for i in range(6))
    mlp = sum(counts[f"VisionTransformer.blocks.{i}.mlp"] for i in range(6))
    total = counts["Global"]
    expect = total - attn / 2 - mlp * 0.75 - counts["VisionTransformer.blocks.5.mlp"] * 0.25
    assert rep.dense_flops == total
    assert rep.kept_flops == pytest.approx(expect)
    text = str(rep)
    assert "heads" in text and "FLOPs" in text


def test_report_with_two_gates_on_one_conv():
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, num_classes=4).eval()
    ds.sparsify_(model, {"channels": "fixed"})
    blk = "layer1.0"
    ds.fix_gates_(model, {f"{blk}.act1.gate": torch.arange(64) < 32, f"{blk}.act2.gate": torch.arange(64) < 16})
    rep = ds.sparsity_report(model, torch.zeros(1, 3, 64, 64))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, 64, 64))
    c = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    p = f"ResNet.{blk}."
    removed = c[p + "conv1"] * 0.5 + c[p + "conv2"] * (1 - 0.5 * 0.25) + c[p + "conv3"] * 0.75
    assert rep.kept_flops == pytest.approx(c["Global"] - removed)


def test_report_without_input_has_no_flops():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    rep = ds.sparsity_report(model)
    assert rep.dense_flops is None and rep.rows == []


def test_import_does_not_import_timm_or_transformers():
    code = "import sys, dynsparse; assert 'timm' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gate_slots_only_in_expected_places(vit):
    ds.sparsify_(vit, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
    places = {fqn.rsplit(".", 1)[-1] for fqn, m in vit.named_modules() if isinstance(m, GateSlot)}
    assert places == {"norm", "drop_path1", "drop_path2"}


def test_unknown_gate_of_a_dimension_with_per_input_gates_lists_and_suggests_them():
    import timm

    with pytest.raises(ds.ConfigError, match=r"Per-input neurons gates: cats, dejavu\..*Did you mean 'cats'"):
        ds.sparsify_(timm.create_model("test_vit"), {"neurons": {"gate": "cat"}})
    with pytest.raises(ds.ConfigError, match=r"Per-input channels gates: .*fbs"):
        ds.sparsify_(timm.create_model("resnet10t"), {"channels": {"gate": "fb"}})


def _kinds(m):
    return [type(b).__name__ for b in m.blocks]


def test_top_level_include_exclude_reach_the_input_dependent_parts(vit):
    """The top-level globs apply to every dimension, input-dependent ones included (joined to a part's own)."""
    from dynsparse.layers.routing import RoutedBlock

    ds.sparsify_(vit, {"depth": {}, "neurons": {"gate": "cats"}, "heads": {"gate": "dejavu"}}, include="blocks.[01]*")
    assert [isinstance(b, RoutedBlock) for b in vit.blocks] == [True, True] + [False] * 4
    assert [type(b.mlp).__name__ for b in vit.blocks][:3] == ["NeuronGatedMlp", "NeuronGatedMlp", "Mlp"]
    assert [type(b.attn).__name__ for b in vit.blocks][:3] == ["HeadGatedAttention", "HeadGatedAttention", "Attention"]
    m = ds.sparsify_(timm.create_model("test_vit"), {"depth": {"include": "blocks.4"}}, include="blocks.0")
    assert [isinstance(b, RoutedBlock) for b in m.blocks] == [True, False, False, False, True, False]
    m = ds.sparsify_(timm.create_model("test_vit"), {"neurons": {"gate": "cats"}}, exclude="blocks.[1-5].*")
    assert [type(b.mlp).__name__ for b in m.blocks][:2] == ["NeuronGatedMlp", "Mlp"]


def test_top_level_globs_with_tokens_check_the_token_blocks_by_name(vit):
    """Token gates are placed by ``tokens.blocks``: the top-level globs must select each of them, else refused."""
    m = ds.sparsify_(vit, {"tokens": {"blocks": [1, 3]}, "depth": {}}, exclude="blocks.5")
    assert _kinds(m) == [
        "RoutedBlock",
        "TokenGatedBlock",
        "RoutedPolicyBlock",
        "TokenGatedBlock",
        "RoutedPolicyBlock",
        "PolicyBlock",
    ]
    fresh = timm.create_model("test_vit")
    with pytest.raises(ds.ConfigError, match=r"'tokens'.*blocks\.3 .*left out by the top-level include / exclude"):
        ds.sparsify_(fresh, {"heads": "sigmoid", "tokens": {"blocks": [1, 3]}}, include="blocks.[0-2]*")
    assert not list(ds.named_gates(fresh))  # refused before any module changed


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_per_dimension_globs_of_depth_work_and_of_tokens_are_refused_by_name(vit, key):
    from dynsparse.layers.routing import RoutedBlock

    ds.sparsify_(vit, {"depth": {key: "blocks.[23]"}})
    routed = [isinstance(b, RoutedBlock) for b in vit.blocks]
    assert routed == [(i in (2, 3)) == (key == "include") for i in range(6)]
    fresh = timm.create_model("test_vit")
    with pytest.raises(ds.ConfigError, match=rf"'tokens\.{key}': token gates are placed by block indices"):
        ds.sparsify_(fresh, {"heads": "sigmoid", "tokens": {"blocks": [1], key: "blocks.1"}})
    assert not list(ds.named_gates(fresh))
    with pytest.raises(ds.ConfigError, match=rf"tokens\.{key}: token gates are placed by block indices"):
        ds.layers.gate_tokens_(fresh, blocks=[1], **{key: "blocks.1"})


@pytest.mark.parametrize(
    ("name", "spec", "match"),
    [
        ("test_vit", {"neurons": {"gate": "cats", "kep": 0.5}}, r"'neurons\.kep': not an option of the 'cats'.*'keep'"),
        ("test_vit", {"heads": {"gate": "dejavu", "rnak": 4}}, r"'heads\.rnak': not an option.*'rank'"),
        ("test_vit", {"tokens": {"gate": "threshold", "blocks": [1], "temprature": 1}}, r"'tokens\.temprature'"),
        ("test_vit", {"depth": {"tarket": 0.5}}, r"'depth\.tarket': not an option of the 'router'.*'target'"),
    ],
)
def test_a_per_input_gate_option_typo_is_refused_with_a_suggestion(name, spec, match):
    """Options of the input-dependent parts are checked against the part's and the gate's arguments before any module
    changes (a typo used to end in the gate class's bare TypeError)."""
    model = timm.create_model(name, pretrained=False)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ds.ConfigError, match=match):
        ds.sparsify_(model, spec)
    assert [type(m) for m in model.modules()] == before

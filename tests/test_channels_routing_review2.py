"""Second review of per-input channel gating (FBS) and block routers: edge cases found by the review."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.gates.channel_gates import FBSGate
from dynsparse.layers.channel_gating import FBSBlockMixin

STRATEGIES = ["auto", "group", "loop", "union", "grouped_conv", "masked"]


def _gated() -> torch.nn.Module:
    torch.manual_seed(0)
    m = ds.sparsify_(timm.create_model("test_resnet", num_classes=7).eval(), {"channels": {"gate": "fbs"}})
    with torch.no_grad():
        for g in m.modules():
            if isinstance(g, FBSGate):
                g.fc.weight.normal_(0, 2.0)  # decisions that differ between inputs
    return m


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=7
    ).eval()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fbs_empty_batch_runs_like_the_host(strategy):
    """A batch of 0 images gives an empty output, as the host does (it crashed for every gathered strategy)."""
    m = _gated()
    for b in m.modules():
        if isinstance(b, FBSBlockMixin):
            b.strategy = strategy
    x = torch.randn(0, 3, 64, 64)
    with torch.no_grad():
        assert m(x).shape == (0, 7)


def test_fbs_on_a_bare_block_is_refused():
    """The model itself being a ResNet block cannot be swapped in place: an error, not a silent no-op."""
    block = timm.create_model("test_resnet").layer1[0]
    before = copy.deepcopy(block)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'<root>' \(BasicBlock\).*root module itself"):
        ds.sparsify_(block, {"channels": {"gate": "fbs"}})
    assert [n for n, _ in block.named_children()] == [n for n, _ in before.named_children()]


@pytest.mark.parametrize("target", ["0.5", True, float("nan"), 1.5])
def test_router_target_errors_name_the_field(target):
    with pytest.raises(ds.ConfigError, match=r"router: target must be a fraction in \[0, 1\]"):
        ds.sparsify_(_vit(), {"depth": {"gate": "router", "target": target}})


def test_depth_blocks_that_are_not_indices_name_the_field():
    with pytest.raises(ds.ConfigError, match=r"depth.blocks: 'all' or block indices in \[0, 4\) expected, got 1.0"):
        ds.sparsify_(_vit(), {"depth": {"blocks": 1.0}})


def test_fbs_unknown_strategy_set_on_a_block_names_the_field():
    """``strategy`` is a public attribute: a typo is a ConfigError (was an UnboundLocalError, or silence at batch 1)."""
    m = _gated()
    m.layer2[0].strategy = "fast"
    for n in (1, 3):
        with torch.no_grad(), pytest.raises(ds.ConfigError, match=r"FBSBasicBlock.strategy: one of auto, .*'fast'"):
            m(torch.randn(n, 3, 64, 64))


def test_fbs_blocks_that_are_not_indices_name_the_field():
    host = timm.create_model("test_resnet")
    with pytest.raises(ds.ConfigError, match=r"channels.blocks: 'all', block indices in \[0, 4\) .* got 1.0"):
        ds.sparsify_(host, {"channels": {"gate": "fbs", "blocks": 1.0}})


@pytest.mark.parametrize("fbs_first", [False, True])
def test_layer_gates_on_fbs_blocks_convert(fbs_first):
    """``layers`` gates reach FBS blocks (either order) and a closed branch of one is removed by convert (was: 'no
    rule to remove a closed branch', or no layer gate at all when FBS came first)."""
    torch.manual_seed(0)
    host = timm.create_model("test_resnet", num_classes=7).eval()
    fbs, layers = {"channels": {"gate": "fbs"}}, {"layers": "fixed"}
    m = ds.sparsify_(ds.sparsify_(host, fbs if fbs_first else layers), layers if fbs_first else fbs)
    gates = dict(ds.named_gates(m))
    assert {"layer1.0.drop_path.gate", "layer1.0.gate.conv1", "layer3.0.drop_path.gate"} <= set(gates)
    ds.fix_gates_(m, {"layer1.0.drop_path": torch.tensor([False])})
    x = torch.randn(2, 3, 64, 64)
    small = ds.convert(m, static=False, verify_inputs=x)
    assert not isinstance(small.layer1[0], FBSBlockMixin) and isinstance(small.layer2[0], FBSBlockMixin)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m.eval()(x))


@pytest.mark.parametrize("blocks", [[0, 0], [0, "layer1.0"]])
def test_fbs_blocks_named_twice_are_refused(blocks):
    model = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(ds.ConfigError, match=r"channels\.blocks: each block once.*twice: layer1\.0"):
        ds.sparsify_(model, {"channels": {"gate": "fbs", "blocks": blocks}})


def test_fbs_on_a_model_with_static_channel_gates_says_so():
    """The blocks are BasicBlocks with static channel gates: the refusal names those gates, not the block type."""
    model = timm.create_model("test_resnet", pretrained=False)
    ds.sparsify_(model, {"channels": {"gate": "fixed"}})
    with pytest.raises(ds.UnsupportedModuleError, match=r"static channel gates already \(layer1\.0\); convert them"):
        ds.sparsify_(model, {"channels": {"gate": "fbs"}})

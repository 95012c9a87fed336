"""Review of the cost model, the report and the knob: cases a user hits that the other test files miss."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.flops import CostModel, count_flops

torch.set_num_threads(1)


def test_counting_keeps_each_submodules_training_flag():
    """A frozen BatchNorm inside a training model (or a training one inside an eval model) stays as it was: the
    whole model used to be put back with one ``train(was_training)``."""
    m = timm.create_model("test_resnet", pretrained=False).train()
    m.bn1.eval()
    count_flops(m, torch.randn(1, 3, 32, 32))
    assert m.training and not m.bn1.training and m.layer1.training
    m.eval()
    m.bn1.train()
    count_flops(m, torch.randn(1, 3, 32, 32))
    assert not m.training and m.bn1.training and not m.layer1.training


def test_counting_under_inference_mode_a_model_feeding_a_parameter_to_a_submodule():
    """Attention pooling (PiT, CaiT alike) passes a parameter into a submodule: under ``torch.inference_mode()`` the
    counter's module tracker failed on it ('NoneType' object has no attribute 'next_functions')."""
    m = timm.create_model("vit_small_patch16_224", global_pool="map", img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    n = count_flops(m, x)
    with torch.inference_mode():
        assert count_flops(m, x) == n
    assert all(p.requires_grad for p in m.parameters())


def _vit_hard_concrete() -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=4)
    m = timm.create_model("vit_tiny_patch16_224", **kw)
    ds.sparsify_(m, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
    with torch.no_grad():
        for _, gate in ds.named_gates(m):
            gate.log_alpha.uniform_(-2, 2, generator=torch.Generator().manual_seed(1))
            gate.log_alpha.copy_(gate.log_alpha.bfloat16())  # the same values in every dtype tested
    return m


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expected_fraction_of_a_low_precision_model(dtype):
    """The costs (about 1e7 FLOPs here) were summed in the gates' dtype: inf in float16, 0.3 % off in bfloat16."""
    m = _vit_hard_concrete()
    x = torch.zeros(1, 3, 32, 32)
    ref = CostModel(m, x).expected_fraction()
    m = m.to(dtype)
    cost = CostModel(m, x.to(dtype))
    got = cost.expected_fraction()
    assert torch.isfinite(got) and abs(float(got) - float(ref)) < 1e-3 * float(ref), (float(got), float(ref))
    got.backward()
    grads = [g.log_alpha.grad for _, g in ds.named_gates(m)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_params_cost_counts_a_tied_weight_once():
    """A weight shared by two modules (a language model's tied embedding and output layer) is one parameter."""
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False))
    model[1].weight = model[0].weight
    cost = CostModel(model, kind="params")
    assert cost.total == sum(p.numel() for p in model.parameters()) == 400


def _tokens_and_routers() -> torch.nn.Module:
    torch.manual_seed(0)
    spec = {"tokens": {"blocks": [0], "keep": 0.3}, "depth": {"keep": 0.5, "exclude": "blocks.0"}}
    return ds.sparsify_(timm.create_model("test_vit", pretrained=False, img_size=32), spec)


def test_an_unknown_gate_name_in_a_budget_suggests_the_close_one():
    """The error listed the first five gates only: a typo in a later one got no useful hint."""
    m = _tokens_and_routers()
    with pytest.raises(ds.ConfigError, match=r"'blocks\.5\.routr'.*Did you mean 'blocks\.5\.router'"):
        ds.set_budget_(m, {"blocks.5.routr": 0.5})
    assert ds.get_budget(m)["blocks.5.router"] == 0.5


def test_a_budget_key_of_a_gate_left_out_by_kind_says_so():
    """A gate that exists but is not of ``kind`` was reported as 'no input-dependent gate named ...'."""
    m = _tokens_and_routers()
    match = r"'blocks\.0\.tokens\.gate' is a ClsAttentionTokenGate; kind= selects BlockRouter"
    with pytest.raises(ds.ConfigError, match=match):
        ds.set_budget_(m, {"blocks.0.tokens.gate": 0.5}, kind=ds.BlockRouter)
    assert ds.get_budget(m)["blocks.0.tokens.gate"] == 0.3

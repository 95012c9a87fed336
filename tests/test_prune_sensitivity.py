"""ds.prune.sensitivity(group="element") on a model pruned already: its masked layers are analysed too."""

from __future__ import annotations

import logging

import torch
from torch import nn

import dynsparse as ds

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _pruned_weights(model):
    """``{param_fqn: weights pruned}`` of the model an evaluation sees."""
    return {f"{i}.weight": int((m.weight == 0).sum()) for i, m in enumerate(model) if hasattr(m, "weight")}


def test_masked_layers_are_analysed_from_their_current_sparsity(caplog):
    model = ds.prune.unstructured_(_model(), 0.5, scope="layer", include="0")  # 64 of 128 weights pruned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def record(m):
        seen.append(_pruned_weights(m))
        return 0.0

    with caplog.at_level(logging.WARNING):
        res = ds.prune.sensitivity(model, record, ratios=[0.0, 0.25, 0.75])
    # the masked layer was left out before ("nothing to analyse" when every layer was masked)
    assert list(res.curves) == ["0.weight", "2.weight"]
    assert seen[:3] == [
        {"0.weight": 64, "2.weight": 0},
        {"0.weight": 64, "2.weight": 0},
        {"0.weight": 96, "2.weight": 0},
    ]
    assert seen[3:] == [
        {"0.weight": 64, "2.weight": 0},
        {"0.weight": 64, "2.weight": 16},
        {"0.weight": 64, "2.weight": 48},
    ]
    assert not caplog.records  # a ratio under the current sparsity is the reference, not a warning
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is ds.prune.MaskedLinear and ds.prune.sparsity(model).layers == {"0.weight": 0.5}


def test_a_fully_masked_model_and_a_named_masked_layer():
    model = ds.prune.unstructured_(_model(), 0.5, scope="layer")
    res = ds.prune.sensitivity(model, lambda m: ds.prune.sparsity(m).pruned, ratios=[0.0, 0.5, 0.75])
    assert res.curves == {"0.weight": [96, 96, 128], "2.weight": [96, 96, 112]}  # 64 + 32 pruned already
    res = ds.prune.sensitivity(model, lambda m: 1.0, ratios=[0.5], layers=["2.weight"])
    assert list(res.curves) == ["2.weight"]


def test_glob_characters_in_a_module_name_prune_that_layer_only():
    model = nn.Sequential()
    model.add_module("a[0]", nn.Linear(4, 4))
    model.add_module("a0", nn.Linear(4, 4))
    pruned = []
    ds.prune.sensitivity(
        model, lambda m: pruned.append(ds.prune.sparsity(m).layers) or 0.0, ratios=[0.5], layers=["a[0].weight"]
    )
    assert pruned == [{"a[0].weight": 0.5}]


def test_the_layers_of_gates_are_left_out():
    """A model with per-input gates (Deja Vu predictors) raised 'no module ... matches' at the predictor's Linear:
    `unstructured_` never prunes the layers of gates, so the analysis must not list them."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    ds.sparsify_(m, {"neurons": {"gate": "dejavu"}}).eval()
    x = torch.randn(2, 3, 16, 16)
    res = ds.prune.sensitivity(m, lambda mm: float(mm(x).abs().mean()), ratios=[0.0, 0.5])
    assert res.curves and not any(".predictor." in name for name in res.curves)
    assert "blocks.0.mlp.fc1.weight" in res.curves

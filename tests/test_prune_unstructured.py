"""Unstructured pruning: ``unstructured_``, ``remove_``, ``reapply_masks_``, ``apply_masks_``.

Invariants: the requested sparsity is reached exactly (global, per layer, and over repeated calls), a pruned weight
is never revived, masked weights stay zero through training, state dicts keep the host keys.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from _prune_helpers import cnn, count, mlp, n_pruned, n_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynsparse import ConfigError, DynsparseError, UnsupportedModuleError, prune
from dynsparse.prune import MaskedConv2d, MaskedLinear

torch.set_num_threads(1)


# ---------------------------------------------------------------- unstructured_: exact sparsity


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("s", [0.0, 0.1, 1 / 3, 0.5, 0.9, 0.97, 1.0])
def test_global_sparsity_is_exact(make, s):
    model = make()
    assert prune.unstructured_(model, s) is model
    total = n_weights(model)
    assert n_pruned(model) == count(s, total)
    rep = prune.sparsity(model)
    assert rep.total == total and rep.pruned == count(s, total)
    assert rep.overall == pytest.approx(count(s, total) / total)


@pytest.mark.parametrize("s", [0.0, 0.25, 0.6, 0.9, 1.0])
def test_layer_sparsity_is_exact(s):
    model = cnn()
    prune.unstructured_(model, s, scope="layer")
    for key, mask in prune.masks(model).items():
        assert int((~mask).sum()) == count(s, mask.numel()), key


def test_magnitude_prunes_the_smallest_weights():
    model = mlp(torch.float64)
    weights = {f"{n}.weight": model.get_submodule(n).weight.detach().abs().clone() for n in ("0", "2", "4")}
    prune.unstructured_(model, 0.6)
    kept = torch.cat([w[m] for w, m in zip(weights.values(), prune.masks(model).values(), strict=True)])
    dropped = torch.cat([w[~m] for w, m in zip(weights.values(), prune.masks(model).values(), strict=True)])
    assert kept.min() >= dropped.max()


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 2**16),
)
def test_iterative_calls_reach_totals_exactly_and_never_unprune(steps, scope, seed):
    model = mlp()
    gen = torch.Generator().manual_seed(seed)
    prev = None
    target = 0.0
    for s in sorted(steps):
        # fresh random scores every call: a pruned weight often scores high, and must stay pruned anyway
        scores = {
            f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=gen) for n in ("0", "2", "4")
        }
        prune.unstructured_(model, s, importance=scores, scope=scope)
        target = s
        masks = prune.masks(model)
        if scope == "global":
            assert n_pruned(model) == count(target, n_weights(model))
        else:
            for key, mask in masks.items():
                assert int((~mask).sum()) == count(target, mask.numel()), key
        if prev is not None:
            for key in masks:
                assert not bool((masks[key] & ~prev[key]).any()), f"{key} revived a weight"
        prev = masks


def test_lower_sparsity_changes_nothing(caplog):
    model = mlp()
    prune.unstructured_(model, 0.8)
    before = prune.masks(model)
    with caplog.at_level(logging.WARNING, logger="dynsparse.prune.unstructured"):
        prune.unstructured_(model, 0.3)
    after = prune.masks(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "already pruned" in caplog.text


def test_ties_still_give_the_exact_count():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    prune.unstructured_(model, 0.37)
    assert n_pruned(model) == count(0.37, 200)


def test_global_and_layer_scopes_differ_on_a_layer_of_tiny_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # 64 tiny weights out of 320
    g = prune.unstructured_(copy.deepcopy(model), 0.5, scope="global")
    layer = prune.unstructured_(copy.deepcopy(model), 0.5, scope="layer")
    assert prune.sparsity(g).layers["2.weight"] == 1.0
    assert prune.sparsity(g).overall == 0.5
    assert prune.sparsity(layer).layers == {"0.weight": 0.5, "2.weight": 0.5}


# ---------------------------------------------------------------- training: masks hold


def test_masked_weights_stay_zero_through_sgd_with_momentum_and_weight_decay():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    x, y = torch.randn(32, 8), torch.randn(32, 3)

    def sgd_step():
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()

    for _ in range(2):  # dense steps first, so momentum buffers hold non-zero values for weights pruned later
        sgd_step()
    prune.unstructured_(model, 0.7)  # the optimizer keeps working on the same parameter objects
    masks = prune.masks(model)
    for _ in range(3):
        sgd_step()
        for key, mask in masks.items():
            layer = model.get_submodule(key.rpartition(".")[0])
            assert bool((layer.masked_weight()[~mask] == 0).all()), key
            assert bool((layer.weight.grad[~mask] == 0).all()), key
    assert any(bool((model.get_submodule(k[:-7]).weight[~m] != 0).any()) for k, m in masks.items())  # momentum
    prune.reapply_masks_(model)
    for key, mask in masks.items():
        assert bool((model.get_submodule(key[:-7]).weight[~mask] == 0).all()), key
    assert n_pruned(model) == count(0.7, n_weights(model))


# ---------------------------------------------------------------- state dict, remove_


def test_state_dict_keeps_host_names_and_round_trips():
    dense = cnn()
    keys = set(dense.state_dict())
    pruned = prune.unstructured_(copy.deepcopy(dense), 0.6)
    sd = pruned.state_dict()
    masked_layers = {"0", "2", "4"}
    assert set(sd) == keys | {f"{n}.weight_mask" for n in masked_layers}
    fresh = prune.unstructured_(cnn(), 0.0)  # all-True masks: ready to load a pruned checkpoint
    fresh.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), pruned(x))
    assert prune.sparsity(fresh) == prune.sparsity(pruned)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_remove_gives_plain_classes_and_equal_outputs(make):
    model = prune.unstructured_(make(torch.float64), 0.8)
    x = torch.randn(2, 8, dtype=torch.float64) if make is mlp else torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # raw weights under the mask are not zero before remove_
        for _, m in model.named_modules():
            if isinstance(m, (MaskedLinear, MaskedConv2d)):
                m.weight[~m.weight_mask] = 3.0
    masks = prune.masks(model)
    params = [id(p) for p in model.parameters()]
    y = model(x)
    assert prune.remove_(model) is model
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten) for m in model.modules())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    assert [id(p) for p in model.parameters()] == params
    assert not any(k.endswith("weight_mask") for k in model.state_dict())
    for key, mask in masks.items():
        assert bool((model.get_submodule(key[:-7]).weight[~mask] == 0).all())
    assert prune.masks(model) == {} and prune.sparsity(model).overall == 0.0


def test_remove_on_a_masked_root_raises():
    with pytest.raises(DynsparseError, match="root"):
        prune.remove_(MaskedLinear(2, 2))


# ---------------------------------------------------------------- selection, swapping


def test_include_exclude_and_exact_types():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    prune.unstructured_(model, 0.5, exclude="2.1")
    assert type(model[0]) is MaskedLinear and type(model[1]) is MyLinear
    assert type(model[2][0]) is MaskedLinear and type(model[2][1]) is nn.Linear
    prune.unstructured_(model, 0.5, include=["2.*"])
    assert type(model[2][1]) is MaskedLinear
    conv = cnn()
    prune.unstructured_(conv, 0.5, layers=(nn.Conv2d,))
    assert type(conv[4]) is nn.Linear and type(conv[0]) is MaskedConv2d


def test_swap_keeps_training_flag_hooks_and_shared_modules():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    calls = []
    shared.register_forward_hook(lambda *a: calls.append(1))
    prune.unstructured_(model, 0.5)
    assert model[0] is model[2] and type(model[0]) is MaskedLinear and not model[0].training
    model(torch.randn(1, 4))
    assert calls == [1, 1]
    assert prune.sparsity(model).total == 16


def test_tied_weights_raise():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ConfigError, match="share one weight"):
        prune.unstructured_(nn.Sequential(a, b), 0.5)


def test_float64_model_stays_float64():
    model = prune.unstructured_(cnn(torch.float64), 0.5, scope="layer")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


# ---------------------------------------------------------------- importance dicts and errors


def test_importance_dict_decides_what_is_pruned():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    scores = {"0.weight": torch.tensor([[1.0, 2, 3], [4, 5, 6]]), "1.weight": torch.tensor([[0.5, 7], [8, 9]])}
    scores["0.bias"] = torch.zeros(2)  # other parameters are ignored
    prune.unstructured_(model, 0.4, importance=scores)
    m = prune.masks(model)
    assert m["0.weight"].tolist() == [[False, False, False], [True, True, True]]
    assert m["1.weight"].tolist() == [[False, True], [True, True]]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"sparsity": 1.5}, ConfigError, r"sparsity must be a number in \[0, 1\]"),
        ({"sparsity": 0.5, "scope": "globl"}, ConfigError, r"Did you mean 'global'"),
        ({"sparsity": 0.5, "importance": "magnitud"}, ConfigError, r"Did you mean 'magnitude'"),
        ({"sparsity": 0.5, "importance": 3}, ConfigError, r"importance must be"),
        ({"sparsity": 0.5, "importance": {"0.weight": torch.ones(16, 8)}}, ConfigError, r"no scores for '2\.weight'"),
        ({"sparsity": 0.5, "importance": {"0.weigth": torch.ones(1)}}, ConfigError, r"'0\.weigth'.*'0\.weight'"),
        ({"sparsity": 0.5, "layers": (nn.Conv1d,)}, ConfigError, r"no masked twin for 'Conv1d'"),
        ({"sparsity": 0.5, "include": "nothing*"}, ConfigError, r"no module of type"),
    ],
)
def test_bad_arguments_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prune.unstructured_(mlp(), **kwargs)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.ones(3, 3), r"'2\.weight' have shape \(3, 3\)"),
        (torch.full((6, 16), math.nan), r"'2\.weight' contain NaN"),
    ],
)
def test_bad_scores_name_the_parameter(bad, match):
    model = mlp()
    scores = {f"{n}.weight": model.get_submodule(n).weight.abs() for n in ("0", "2", "4")}
    scores["2.weight"] = bad
    before = prune.masks(model)
    with pytest.raises(ConfigError, match=match):
        prune.unstructured_(model, 0.5, importance=scores)
    assert prune.masks(model) == before == {}  # nothing was swapped


def test_root_layer_cannot_be_swapped():
    with pytest.raises(UnsupportedModuleError, match="root"):
        prune.unstructured_(nn.Linear(4, 4), 0.5)
    root = MaskedLinear(4, 4)  # an already-masked root just gets a new mask
    prune.unstructured_(root, 0.5)
    assert prune.sparsity(root).overall == 0.5


def test_apply_masks_ands_with_existing_masks():
    model = mlp()
    prune.unstructured_(model, 0.5)
    old = prune.masks(model)
    nm = prune.nm_mask(model[0].weight, 2, 4)
    prune.apply_masks_(model, {"0.weight": nm, "4.weight": torch.ones(3, 6, dtype=torch.bool)})
    new = prune.masks(model)
    assert torch.equal(new["0.weight"], old["0.weight"] & nm)
    assert torch.equal(new["4.weight"], old["4.weight"])
    with pytest.raises(ConfigError, match=r"'0\.wieght'"):
        prune.apply_masks_(model, {"0.wieght": nm})
    with pytest.raises(ConfigError, match="shape"):
        prune.apply_masks_(model, {"2.weight": nm})


def test_the_layers_of_gates_are_never_pruned():
    """Per-input predictors (Deja Vu neurons and heads) decide for each input; pruning them would change decisions."""
    import timm

    import dynsparse as ds

    m = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=6)
    ds.sparsify_(m, {"neurons": {"gate": "dejavu"}, "heads": {"gate": "dejavu"}})
    before = {k: v.clone() for k, v in m.state_dict().items() if ".predictor." in k}
    prune.unstructured_(m, sparsity=0.5)
    assert not any(isinstance(x, MaskedLinear) for n, x in m.named_modules() if ".predictor" in n)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k
    masked = [x for x in m.modules() if isinstance(x, (MaskedLinear, MaskedConv2d))]
    total = sum(x.weight_mask.numel() for x in masked)
    assert masked and sum(int((x.weight_mask == 0).sum()) for x in masked) == round(0.5 * total)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_row_scope_prunes_every_output_row_exactly_and_keeps_its_largest(s):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 7), nn.Conv2d(3, 4, 3))
    w = [m[0].weight.detach().clone(), m[1].weight.detach().clone()]
    prune.unstructured_(m, s, scope="row")
    for layer, w0 in zip(m, w, strict=True):
        rows = layer.weight_mask.reshape(layer.weight_mask.shape[0], -1)
        n = rows.shape[1]
        assert ((~rows.bool()).sum(1) == round(s * n)).all()  # the same count in every row
        kept = w0.abs().reshape(rows.shape)
        for r in range(rows.shape[0]):  # the kept ones are the row's largest
            k = int(rows[r].sum())
            assert set(rows[r].nonzero().flatten().tolist()) == set(kept[r].topk(k).indices.tolist())


def test_row_scope_never_revives_and_counts_pruned_ones():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 3))
    prune.unstructured_(m, 0.25, scope="global")  # uneven rows
    before = m[0].weight_mask.clone()
    prune.unstructured_(m, 0.5, scope="row")
    after = m[0].weight_mask
    assert not (after.bool() & ~before.bool()).any()
    assert ((~after.bool()).sum(1) >= 4).all()
    assert ((~after.bool()).sum(1) == torch.clamp((~before.bool()).sum(1), min=4)).all()

"""``flops_keep_masks`` / ``structured_(..., flops=...)``: a FLOPs budget ranked by score per FLOP."""

from __future__ import annotations

import copy
import types

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.flops import CostModel, count_flops
from dynsparse.importance import MagnitudeImportance, RandomImportance, flops_keep_masks, keep_masks


class _Gate:
    def __init__(self, n: int) -> None:
        self.n = n

    def keep_mask(self) -> torch.Tensor:
        return torch.ones(self.n, dtype=torch.bool)


def _cost(terms, sizes, total):
    """A hand-written cost model: kept = sum(cost * prod(fractions of the key)) / total."""
    slots = [(name, types.SimpleNamespace(gate=_Gate(n))) for name, n in sizes]
    return types.SimpleNamespace(slots=slots, terms=terms, total=total)


def test_cheapest_score_per_flop_goes_first_not_the_lowest_score():
    # a: 2 units at 50 FLOPs each, b: 2 units at 5 FLOPs each, 50 FLOPs nobody gates; total 160
    cost = _cost([((), 50.0), ((0,), 100.0), ((1,), 10.0)], [("a", 2), ("b", 2)], 160.0)
    scores = {"a.gate": torch.tensor([1.0, 5.0]), "b.gate": torch.tensor([0.6, 0.4])}
    # score per FLOP: a0 1/50 = 0.02 < b1 0.4/5 = 0.08, so a0 goes first though b's scores are lower
    m = flops_keep_masks(scores, cost, 0.7)
    assert m["a.gate"].tolist() == [False, True] and m["b.gate"].tolist() == [True, True]  # kept 110/160 = 0.6875
    # a ranking by score alone removes b's unit instead (and saves 5 FLOPs, not 50)
    assert keep_masks(scores, num_pruned=1)["b.gate"].tolist() == [True, False]
    # further: b1 (0.08) before a1 (5/50 = 0.1) before b0 (0.6/5 = 0.12)
    m = flops_keep_masks(scores, cost, 0.66)
    assert m["a.gate"].tolist() == [False, True] and m["b.gate"].tolist() == [True, False]  # 105/160 = 0.656
    m = flops_keep_masks(scores, cost, 0.4, min_keep=0)
    assert m["a.gate"].tolist() == [False, False] and m["b.gate"].tolist() == [True, False]  # 55/160 = 0.344
    m = flops_keep_masks(scores, cost, 0.4)  # min_keep=1: each gate keeps a unit, and the budget is out of reach
    assert m["a.gate"].tolist() == [False, True] and m["b.gate"].tolist() == [True, False]


def test_marginal_costs_follow_a_shared_conv():
    # one conv between the gates costs 100 * fa * fb: closing a's units makes b's cheaper
    cost = _cost([((0, 1), 100.0), ((0,), 20.0)], [("a", 4), ("b", 4)], 120.0)
    scores = {"a.gate": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b.gate": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    m = flops_keep_masks(scores, cost, 0.5)
    ka, kb = int(m["a.gate"].sum()), int(m["b.gate"].sum())
    kept = (100 * ka * kb / 16 + 20 * ka / 4) / 120
    assert kept <= 0.5
    # equal scores: a unit of a saves (100 + 20) / 4 = 30 FLOPs, one of b 100 / 4 = 25, so a goes first
    # (kept 90/120); next a again saves (100 * 1 + 20) / 4 = 30 (b is still open), b only 100 * 0.75 / 4
    assert (ka, kb) == (2, 4) and kept == 0.5
    m = flops_keep_masks(scores, cost, 0.9)  # kept 0.75 after one unit: one step only
    assert int(m["a.gate"].sum()) == 3 and int(m["b.gate"].sum()) == 4


def test_round_to_and_max_sparsity():
    cost = _cost([((0,), 100.0), ((1,), 100.0)], [("a", 10), ("b", 10)], 200.0)
    g = torch.Generator().manual_seed(0)
    scores = {"a.gate": torch.rand(10, generator=g), "b.gate": torch.rand(10, generator=g)}
    m = flops_keep_masks(scores, cost, 0.3, round_to=4)
    for k in m:
        assert int(m[k].sum()) in (0, 4, 8, 10) and int(m[k].sum()) > 0
    m = flops_keep_masks(scores, cost, 0.1, max_sparsity=0.6)  # cannot go below 40 % of either gate
    assert all(int(v.sum()) == 4 for v in m.values())


def test_structured_flops_reaches_the_budget_and_converts():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", zero_init_last=False).eval()
    x = torch.randn(8, 3, 32, 32)
    dense = count_flops(net, x[:1])
    results = {}
    for name, imp, norm in [("l1", MagnitudeImportance(), "l2"), ("random", RandomImportance(0), "none")]:
        model = ds.prune.structured_(copy.deepcopy(net), ["channels"], importance=imp, flops=0.7, normalize=norm,
                                     example_input=x[:1])  # fmt: skip
        small = ds.convert(model)
        kept = count_flops(small, x[:1]) / dense
        assert torch.allclose(small(x), model(x), atol=1e-5)
        assert CostModel(model, x[:1]).fraction() == pytest.approx(kept, abs=1e-6)
        assert 0.7 - 0.05 < kept <= 0.7, (name, kept)  # at most about one channel's FLOPs below the budget
        results[name] = [int(g.keep_mask().sum()) for _, g in ds.named_gates(model)]
    assert results["l1"] != results["random"]  # same FLOPs, different cuts


def test_bad_input_is_named():
    net = ds.sparsify_(timm.create_model("test_resnet"), {"channels": "fixed"})
    cm = CostModel(net, torch.randn(1, 3, 32, 32))
    scores = MagnitudeImportance()(net)
    neg = {k: -v - 1 for k, v in scores.items()}
    with pytest.raises(ConfigError, match="negative"):
        flops_keep_masks(neg, cm, 0.5)
    with pytest.raises(ConfigError, match=r"no gate 'nope\.gate'"):
        flops_keep_masks({"nope.gate": torch.ones(3)}, cm, 0.5)
    with pytest.raises(ConfigError, match="keep"):
        flops_keep_masks(scores, cm, 0.0)
    with pytest.raises(ConfigError, match="CostModel"):
        flops_keep_masks(scores, object(), 0.5)
    with pytest.raises(ConfigError, match="list like"):
        ds.prune.structured_(net, {"channels": 0.5}, flops=0.5)
    with pytest.raises(ConfigError, match="scope='layer'"):
        ds.prune.structured_(net, ["channels"], flops=0.5, scope="layer")
    with pytest.raises(ConfigError, match="flops must be"):
        ds.prune.structured_(net, ["channels"], flops=1.5)


def test_one_shot_iterators_as_data_work_with_a_flops_budget():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", zero_init_last=False).eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    a = ds.prune.structured_(copy.deepcopy(net), ["channels"], importance="taylor", data=iter(batches), flops=0.7)
    b = ds.prune.structured_(copy.deepcopy(net), ["channels"], importance="taylor", data=batches, flops=0.7)
    masks_a = {f: g.keep_mask() for f, g in ds.named_gates(a)}
    masks_b = {f: g.keep_mask() for f, g in ds.named_gates(b)}
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)

"""structured_ / sensitivity / keep_masks respect the gates' current state; branch-gate normalisation; callables."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.flops import CostModel
from dynsparse.importance import MagnitudeImportance, RandomImportance, flops_keep_masks, keep_masks

torch.set_num_threads(1)
X = torch.randn(2, 3, 32, 32)


def _closed(model):
    return {f: ~g.keep_mask() for f, g in ds.named_gates(model)}


def test_keep_masks_current_closed_units_go_first_and_stay_closed():
    s = {"a.gate": torch.tensor([4.0, 3, 2, 1]), "b.gate": torch.tensor([1.0, 2, 3, 4])}
    cur = {"a.gate": torch.tensor([False, True, True, True])}  # the best unit of a is closed already
    m = keep_masks(s, 0.5, scope="layer", current=cur)
    assert m["a.gate"].tolist() == [False, True, True, False]
    assert m["b.gate"].tolist() == [False, False, True, True]
    m = keep_masks(s, 0.25, scope="global", normalize="l2", current=cur)  # l2 over open units: 1/√14 > 1/√30
    assert m["a.gate"].tolist() == [False, True, True, True] and m["b.gate"].tolist() == [False, True, True, True]
    # a lower target than the gate's closed fraction closes nothing more and re-opens nothing
    assert keep_masks(s, 0.0, scope="layer", current=cur)["a.gate"].tolist() == [False, True, True, True]
    with pytest.raises(ds.ConfigError, match=r"current mask for 'a\.gate'"):
        keep_masks(s, 0.5, current={"a.gate": torch.ones(3, dtype=torch.bool)})


def test_structured_again_never_reopens_closed_units():
    torch.manual_seed(0)
    v = timm.create_model("test_vit").eval()
    ds.prune.structured_(v, {"neurons": 0.25}, importance=RandomImportance(seed=0))
    before = _closed(v)
    ds.prune.structured_(v, {"neurons": 0.5}, importance=RandomImportance(seed=1))  # other scores: would re-open
    for f, g in ds.named_gates(v):
        now = ~g.keep_mask()
        assert not bool((before[f] & ~now).any()), f"{f}: a closed unit re-opened"
        assert int(now.sum()) == g.num_units // 2, f


def test_structured_flops_again_never_reopens_closed_units():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet").eval()
    ds.prune.structured_(m, ["channels"], flops=0.8, importance=RandomImportance(seed=0), example_input=X[:1])
    before = _closed(m)
    ds.prune.structured_(m, ["channels"], flops=0.6, importance=RandomImportance(seed=1), example_input=X[:1])
    for f, now in _closed(m).items():
        assert not bool((before[f] & ~now).any()), f"{f}: a closed unit re-opened"
    assert CostModel(m, X[:1]).fraction() <= 0.6


def test_flops_keep_masks_counts_closed_units_as_pruned():
    m = ds.sparsify_(timm.create_model("test_resnet").eval(), {"channels": "fixed"})
    cost = CostModel(m, X[:1])
    scores = MagnitudeImportance()(m)
    cur = {f: torch.ones(s.numel(), dtype=torch.bool) for f, s in scores.items()}
    first = next(iter(cur))
    cur[first][: len(cur[first]) // 2] = False
    masks = flops_keep_masks(scores, cost, 0.9, current=cur)
    assert not bool((~cur[first] & masks[first]).any())
    ds.fix_gates_(m, masks)
    assert cost.fraction() <= 0.9


def test_sensitivity_runs_learned_gates_as_they_are():
    torch.manual_seed(0)
    v = timm.create_model("test_vit").eval()
    ds.sparsify_(v, {"neurons": "hard_concrete"})
    with torch.no_grad():
        for _, g in ds.named_gates(v):
            g.log_alpha[: g.num_units // 2] = -10.0  # learned: half of each gate closed
    ref = v(X).detach()
    k = "blocks.0.mlp.norm.gate"
    res = ds.prune.sensitivity(
        v, lambda mm: float((mm(X) - ref).abs().max()), ratios=[0.0, 0.001, 0.4, 0.8], group="units", layers=[k]
    )
    d0, d_small, d_below, d_above = res.curves[k]
    assert d0 < 1e-5 and d_small < 1e-5 and d_below < 1e-5  # nothing pruned beyond what the gate closes
    assert d_above > 1e-3
    assert isinstance(dict(ds.named_gates(v))[k], ds.HardConcreteGate)  # the model itself is untouched


def test_normalize_ranks_branch_gates_together():
    s = {f"blocks.{i}.drop_path1.gate": torch.tensor([v]) for i, v in enumerate([5.0, 0.1, 3.0, 0.2])}
    for norm in ("none", "l2", "mean"):
        m = keep_masks(s, 0.5, scope="global", normalize=norm)
        assert [k for k, v in m.items() if not v.all()] == ["blocks.1.drop_path1.gate", "blocks.3.drop_path1.gate"]


def test_normalize_l2_closes_the_lowest_branches_through_structured():
    torch.manual_seed(0)
    v = timm.create_model("test_vit").eval()
    imp = RandomImportance(seed=0)
    ds.prune.structured_(v, {"neurons": 0.5, "layers": 0.25}, importance=imp, scope="global", normalize="l2")
    raw = {k: float(s) for k, s in imp(v).items() if s.numel() == 1}
    closed = {f for f, g in ds.named_gates(v) if g.num_units == 1 and not bool(g.keep_mask().all())}
    assert closed == set(sorted(raw, key=raw.get)[: len(closed)]) and len(closed) == 3


def test_structured_accepts_a_plain_callable_importance():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet").eval()
    ref = copy.deepcopy(m)
    calls = []

    def my_importance(model, data=None):
        calls.append(data)
        return MagnitudeImportance(p=2)(model, data)

    ds.prune.structured_(m, {"channels": 0.5}, importance=my_importance)
    ds.prune.structured_(ref, {"channels": 0.5}, importance={"name": "magnitude", "p": 2})
    assert calls == [None]
    for (f, g), (_, h) in zip(ds.named_gates(m), ds.named_gates(ref), strict=True):
        assert torch.equal(g.keep_mask(), h.keep_mask()), f

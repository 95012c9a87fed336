"""Tests of the top-k gate."""

from __future__ import annotations

import pytest
import torch
from _gate_helpers import _kw_id, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsparse.errors import GateError
from dynsparse.gates import TopKGate
from dynsparse.gates import functional as F

# --------------------------------------------------------------------------------------------------------------
# Top-k gate
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(8))
def test_topk_keeps_exactly_k(k: int) -> None:
    gate = TopKGate(7, k=k)
    scores = torch.randperm(7, generator=torch.Generator().manual_seed(k)).float()
    with torch.no_grad():
        gate.scores.copy_(scores)
    mask = gate.keep_mask()
    assert int(mask.sum()) == k
    if 0 < k < 7:
        assert scores[mask].min() > scores[~mask].max()
    for training in (True, False):
        assert torch.equal(gate.train(training)().detach(), mask.float())


@pytest.mark.parametrize(
    ("n", "keep", "k"),
    [
        (10, 1.0, 10),
        (10, 0.0, 0),
        (10, 0.5, 5),
        (10, 0.24, 2),
        (10, 0.25, 3),  # 2.5 rounds half up
        (5, 0.5, 3),  # 2.5 rounds half up
        (4, 0.625, 3),  # 2.5 rounds half up
        (7, 0.5, 4),  # 3.5
        (10, 0.01, 1),  # at least one when keep > 0
        (3, 1e-9, 1),
        (1, 0.4, 1),
    ],
)
def test_topk_keep_ratio_rounding(n: int, keep: float, k: int) -> None:
    gate = TopKGate(n, keep=keep)
    assert gate.k == k
    assert int(gate.keep_mask().sum()) == k


def test_topk_ties_go_to_lower_index() -> None:
    assert TopKGate(5, k=3).keep_mask().tolist() == [True, True, True, False, False]
    gate = TopKGate(5, k=2)
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert gate.keep_mask().tolist() == [True, False, True, False, False]
    gate.set_k_(k=4)
    assert gate.keep_mask().tolist() == [True, True, True, False, True]


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.integers(-2, 2), min_size=1, max_size=12), data=st.data())
def test_topk_mask_property(scores: list[int], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(scores)))
    mask = F.topk_mask(torch.tensor(scores, dtype=torch.float64), k).tolist()
    assert sum(mask) == k
    for j, kept in enumerate(mask):
        for i, dropped in enumerate(mask):
            if kept and not dropped:
                assert scores[j] > scores[i] or (scores[j] == scores[i] and j < i), (scores, k, mask)


def test_topk_straight_through_gradient_reaches_scores() -> None:
    gate = TopKGate(5, k=2, dtype=torch.float64).train()
    scores = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        gate.scores.copy_(scores)
    out = gate()
    assert out.detach().tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    w = torch.arange(1.0, 6.0, dtype=torch.float64)
    (out * w).sum().backward()
    s = torch.sigmoid(scores)
    assert_close(gate.scores.grad, w * s * (1 - s), what="d topk / d scores")
    assert (gate.scores.grad != 0).all()


def test_topk_set_k_() -> None:
    gate = TopKGate(6)
    assert gate.k == 6
    assert gate.set_k_(k=2) is gate
    assert gate.k == 2 and int(gate.keep_mask().sum()) == 2
    assert gate.set_k_(keep=0.5).k == 3
    assert gate.set_k_(k=0).keep_mask().tolist() == [False] * 6
    assert gate.set_k_().k == 6  # neither: back to open
    with pytest.raises(GateError):
        gate.set_k_(k=7)
    with pytest.raises(GateError):
        gate.set_k_(k=1, keep=0.5)
    assert gate.k == 6, "a failed set_k_ must not change k"
    assert "k=6" in repr(gate)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 2, "keep": 0.5},
        {"k": -1},
        {"k": 7},
        {"k": 2.0},
        {"k": True},  # a bool is not a count, as for num_units
        {"keep": -0.1},
        {"keep": 1.1},
        {"keep": float("nan")},
    ],
    ids=_kw_id,
)
def test_topk_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(GateError, match="TopKGate"):
        TopKGate(6, **kwargs)

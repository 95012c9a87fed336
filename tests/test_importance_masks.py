"""Tests of the score -> mask step of `dynsparse.importance`: ``unstructured_masks`` (per weight) and ``keep_masks``
(per unit): exact counts, ties, scopes, normalisation, ``min_keep`` / ``max_sparsity`` / ``round_to``, bad arguments.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _importance_helpers import f64
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.importance import keep_masks, unstructured_masks

# ------------------------------------------------------------------------------------------------------------------
# Unstructured masks
# ------------------------------------------------------------------------------------------------------------------


def test_unstructured_masks_exact_counts_ties_and_prune_agreement() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    scores = {"0.weight": torch.ones(7, 5), "2.weight": torch.randint(0, 3, (3, 7)).float()}  # many ties
    n = 35 + 21
    for sp in (0.0, 0.3, 0.5, 0.77, 1.0):
        g = unstructured_masks(scores, sp)
        assert sum(int((~v).sum()) for v in g.values()) == math.floor(sp * n + 0.5)
        lay = unstructured_masks(scores, sp, scope="layer")
        for v in lay.values():
            assert int((~v).sum()) == math.floor(sp * v.numel() + 0.5)
        row = unstructured_masks(scores, sp, scope="row")
        for v in row.values():
            assert all(int((~r).sum()) == math.floor(sp * v.shape[1] + 0.5) for r in v)
        # same masks as dynsparse.prune.unstructured_ with the same scores (same tie rule)
        pruned = ds.prune.unstructured_(copy.deepcopy(model), sp, importance=scores)
        for k, v in ds.prune.masks(pruned).items():
            assert torch.equal(v, g[k]), (sp, k)
    ex = unstructured_masks(scores, 0.5, exclude="2.*")
    assert list(ex) == ["0.weight"]
    assert unstructured_masks({"w": f64([[3.0, 1.0], [2.0, 4.0]])}, 0.5)["w"].tolist() == [[True, False], [False, True]]
    with pytest.raises(ConfigError, match="Did you mean 'layer'"):
        unstructured_masks(scores, 0.5, scope="layers")
    with pytest.raises(ConfigError, match="NaN"):
        unstructured_masks({"w": f64([1.0, float("nan")])}, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# keep_masks
# ------------------------------------------------------------------------------------------------------------------


def test_keep_masks_global_vs_layer_and_constraints() -> None:
    s = {"a.gate": f64([1.0, 2.0, 3.0, 4.0]), "b.gate": f64([10.0, 20.0, 30.0, 40.0])}
    glob, lay = keep_masks(s, 0.5), keep_masks(s, 0.5, scope="layer")
    assert glob["a.gate"].tolist() == [False, False, False, True]  # min_keep=1 stops the global ranking
    assert glob["b.gate"].tolist() == [False, True, True, True]
    assert lay["a.gate"].tolist() == lay["b.gate"].tolist() == [False, False, True, True]
    # per-gate normalisation makes both gates equal: global then matches layer-wise
    assert {k: v.tolist() for k, v in keep_masks(s, 0.5, normalize="l2").items()} == {
        k: v.tolist() for k, v in lay.items()
    }
    # max_sparsity caps each gate; the total is then short and the rest is kept
    capped = keep_masks(s, 0.5, max_sparsity=0.25)
    assert [int((~v).sum()) for v in capped.values()] == [1, 1]
    # min_keep
    mk = keep_masks(s, 1.0, min_keep=2)
    assert [int(v.sum()) for v in mk.values()] == [2, 2]
    # num_pruned (global and per gate)
    assert sum(int((~v).sum()) for v in keep_masks(s, num_pruned=3).values()) == 3
    assert [int((~v).sum()) for v in keep_masks(s, num_pruned=1, scope="layer").values()] == [1, 1]
    # single-unit (branch) gates are exempt from min_keep and can close
    br = keep_masks({"x.gate": f64([0.1]), "y.gate": f64([0.5]), "z.gate": f64([0.9])}, num_pruned=2)
    assert [v.tolist() for v in br.values()] == [[False], [False], [True]]
    # ties: the lower unit index is kept
    assert keep_masks({"t.gate": torch.ones(4)}, 0.5)["t.gate"].tolist() == [True, True, False, False]


def test_keep_masks_round_to() -> None:
    torch.manual_seed(0)
    s = {"a.gate": torch.rand(20), "b.gate": torch.rand(13), "c.gate": torch.rand(7)}
    for sp in (0.1, 0.3, 0.5, 0.9):
        for scope in ("global", "layer"):
            m = keep_masks(s, sp, scope=scope, round_to=4)
            for k, v in m.items():
                kept = int(v.sum())
                assert kept % 4 == 0 or kept == v.numel(), (sp, scope, k, kept)
                assert kept >= 1
            if scope == "layer":
                for v in m.values():  # nearest allowed count to the exact per-gate target
                    n = v.numel()
                    target = n - math.floor(sp * n + 0.5)
                    allowed = [c for c in range(4, n + 1, 4)] + [n]
                    assert int(v.sum()) == min(allowed, key=lambda c: (abs(c - target), -c))
            # the kept units are the highest-scored of their gate
            for k, v in m.items():
                if (~v).any() and v.any():
                    assert s[k][v].min() >= s[k][~v].max()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(["global", "layer"]),
    normalize=st.sampled_from(["none", "l2", "mean"]),
)
def test_keep_masks_exact_counts(sizes, sparsity, seed, scope, normalize) -> None:
    g = torch.Generator().manual_seed(seed)
    s = {f"g{i}.gate": torch.randint(0, 4, (n,), generator=g).float() for i, n in enumerate(sizes)}  # with ties
    m = keep_masks(s, sparsity, scope=scope, normalize=normalize, min_keep=0)
    assert list(m) == list(s) and all(v.dtype == torch.bool and v.shape == s[k].shape for k, v in m.items())
    if scope == "global":
        assert sum(int((~v).sum()) for v in m.values()) == math.floor(sparsity * sum(sizes) + 0.5)
    else:
        assert all(int((~v).sum()) == math.floor(sparsity * v.numel() + 0.5) for v in m.values())
    # with min_keep=1 every multi-unit gate keeps one
    m1 = keep_masks(s, sparsity, scope=scope, normalize=normalize)
    assert all(int(v.sum()) >= 1 for v in m1.values() if v.numel() > 1)


def test_keep_masks_rejects_bad_arguments() -> None:
    s = {"a.gate": torch.rand(4)}
    with pytest.raises(ConfigError, match="exactly one"):
        keep_masks(s)
    with pytest.raises(ConfigError, match="exactly one"):
        keep_masks(s, 0.5, num_pruned=1)
    with pytest.raises(ConfigError, match="Did you mean 'global'"):
        keep_masks(s, 0.5, scope="globl")
    with pytest.raises(ConfigError, match="1-D"):
        keep_masks({"a.gate": torch.rand(2, 2)}, 0.5)
    with pytest.raises(ConfigError, match="round_to"):
        keep_masks(s, 0.5, round_to=0)
    with pytest.raises(ConfigError, match="sparsity"):
        keep_masks(s, 1.5)


def test_keep_masks_closed_units_over_the_cap_count_towards_the_pruned() -> None:
    """Units closed already beyond ``max_sparsity`` stay closed and count as pruned: the other gates were cut as if
    they did not count (24 units pruned for the 22 asked)."""
    s = {"a": torch.arange(10.0), "b": torch.arange(100.0) + 100}
    current = {"a": torch.tensor([False] * 5 + [True] * 5)}  # 5 closed, max_sparsity 0.3 allows 3
    m = keep_masks(s, 0.2, max_sparsity=0.3, current=current)
    pruned = {k: int((~v).sum()) for k, v in m.items()}
    assert pruned == {"a": 5, "b": 17}, pruned  # 22 = floor(0.2 * 110 + 0.5)
    assert not bool(m["a"][:5].any())

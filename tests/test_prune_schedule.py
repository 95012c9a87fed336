"""Pruning schedules (``agp``, ``linear``, ``one_shot``, ``exponential``) and ``IterativePruner``.

The schedule formulas are re-implemented here from Zhu & Gupta 2017 (methods.md 2.11) and SynFlow, independently
of the code; the iterative pruner reaches each scheduled sparsity exactly and never revives a weight.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _prune_helpers import count, mlp, n_pruned, n_weights
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsparse import ConfigError, prune

torch.set_num_threads(1)


# ---------------------------------------------------------------- schedules


def agp_ref(t, si, sf, t0, n_dt):
    return sf + (si - sf) * (1 - (t - t0) / n_dt) ** 3


def test_agp_endpoints_and_formula():
    assert prune.agp(-5, 0.1, 0.9, 10, 110) == 0.1
    assert prune.agp(10, 0.1, 0.9, 10, 110) == 0.1
    assert prune.agp(110, 0.1, 0.9, 10, 110) == 0.9
    assert prune.agp(10**6, 0.1, 0.9, 10, 110) == 0.9
    for t in range(10, 110, 10):
        assert prune.agp(t, 0.1, 0.9, 10, 110, frequency=10) == pytest.approx(agp_ref(t, 0.1, 0.9, 10, 100))
    assert prune.agp(60, 0.0, 0.8, 10, 110) == pytest.approx(0.8 - 0.8 * 0.5**3)


def test_agp_is_piecewise_constant_between_updates():
    f = functools.partial(prune.agp, initial=0.0, final=0.9, begin=0, end=95, frequency=10)
    for k in range(9):
        values = {f(t) for t in range(10 * k, 10 * k + 10)}
        assert len(values) == 1, k
    assert f(94) == f(90) < f(95) == 0.9  # the final value at `end`, even off the frequency grid


@settings(max_examples=60, deadline=None)
@given(
    a=st.integers(-50, 300),
    b=st.integers(-50, 300),
    initial=st.floats(0.0, 0.5),
    final=st.floats(0.5, 1.0),
    begin=st.integers(0, 50),
    span=st.integers(1, 200),
    frequency=st.integers(1, 30),
)
def test_schedules_are_monotone_and_bounded(a, b, initial, final, begin, span, frequency):
    lo, hi = min(a, b), max(a, b)
    end = begin + span
    for f in (
        functools.partial(prune.agp, initial=initial, final=final, begin=begin, end=end, frequency=frequency),
        functools.partial(prune.linear, initial=initial, final=final, begin=begin, end=end),
    ):
        assert initial <= f(lo) <= f(hi) <= final
        assert f(begin) == initial and f(end) == final and f(end + 1) == final
    expo = functools.partial(prune.exponential, final_density=1 - final if final < 1 else 0.5, n=max(1, span // 10))
    assert 0.0 <= expo(lo) <= expo(hi) <= 1.0
    one = functools.partial(prune.one_shot, final=final, at=begin)
    assert one(lo) <= one(hi)


def test_linear_one_shot_and_exponential_endpoints():
    assert prune.linear(5, 0.2, 0.6, 5, 15) == 0.2
    assert prune.linear(10, 0.2, 0.6, 5, 15) == pytest.approx(0.4)
    assert prune.linear(15, 0.2, 0.6, 5, 15) == 0.6
    assert prune.one_shot(2, 0.7, at=3) == 0.0 and prune.one_shot(3, 0.7, at=3) == 0.7
    assert prune.one_shot(0, 0.7) == 0.7
    assert prune.exponential(0, 0.01, 4) == 0.0
    assert prune.exponential(4, 0.01, 4) == 1 - 0.01
    assert prune.exponential(99, 0.01, 4) == 1 - 0.01
    densities = [1 - prune.exponential(k, 0.01, 4) for k in range(5)]
    for k in range(4):  # each round keeps the same fraction, d_f^(1/n), of what is left
        assert densities[k + 1] / densities[k] == pytest.approx(0.01**0.25)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: prune.agp(0, 0.0, 0.9, 10, 10), "end"),
        (lambda: prune.agp(0, 0.0, 0.9, 0, 10, frequency=0), "frequency"),
        (lambda: prune.linear(0, -0.1, 0.9, 0, 10), "initial"),
        (lambda: prune.one_shot(0, 2.0), "final"),
        (lambda: prune.exponential(0, 0.0, 3), "final_density"),
        (lambda: prune.exponential(0, 0.5, 0), "n must"),
    ],
)
def test_bad_schedule_arguments_raise(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_iterative_pruner_follows_agp_exactly():
    model = mlp()
    schedule = functools.partial(prune.agp, initial=0.0, final=0.9, begin=2, end=20, frequency=4)
    pruner = prune.IterativePruner(model, schedule, scope="global")
    seen, prev = [], None
    for t in range(25):
        changed = pruner.step(t)
        if changed:
            seen.append(t)
        masks = prune.masks(model)
        assert n_pruned(model) == count(schedule(t), n_weights(model))
        if prev is not None:
            assert all(not bool((masks[k] & ~prev[k]).any()) for k in masks)
        prev = masks
    assert seen == [0, 6, 10, 14, 18, 20]  # at `begin` the ramp is still at `initial`
    assert pruner.state_dict() == {"target": 0.9}


def test_iterative_pruner_calls_an_importance_function():
    model = mlp()
    calls = []

    def importance(m):
        calls.append(1)
        return {f"{n}.weight": torch.rand(m.get_submodule(n).weight.shape) for n in ("0", "2", "4")}

    pruner = prune.IterativePruner(
        model, functools.partial(prune.exponential, final_density=0.1, n=3), importance=importance
    )
    for k in range(5):
        pruner.step(k)
    assert len(calls) == 4  # rounds 0, 1, 2, 3; round 4 repeats round 3's target
    assert n_pruned(model) == count(0.9, n_weights(model))

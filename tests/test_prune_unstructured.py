"""Unstructured pruning (masked twins, ``unstructured_``, ``remove_``) and the pruning schedules.

Invariants: the requested sparsity is reached exactly (global, per layer, and over repeated calls), a pruned weight
is never revived, masked weights have no effect and no gradient, state dicts keep the host keys. Schedule
formulas are re-implemented here from Zhu & Gupta 2017 (methods.md 2.11) and SynFlow, independently of the code.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynsparse import ConfigError, DynsparseError, UnsupportedModuleError, prune
from dynsparse.prune import MaskedConv2d, MaskedLinear

torch.set_num_threads(1)


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


def cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).to(dtype)


def count(fraction, n):
    return math.floor(fraction * n + 0.5)


def n_pruned(model):
    return sum(int((~m).sum()) for m in prune.masks(model).values())


def n_weights(model):
    return sum(m.numel() for m in prune.masks(model).values())


# ---------------------------------------------------------------- masked twins


@pytest.mark.parametrize(
    ("host", "x"),
    [
        (nn.Linear(5, 7), torch.randn(2, 3, 5)),
        (nn.Linear(5, 7, bias=False), torch.randn(4, 5)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), torch.randn(2, 3, 6, 6)),
        (nn.Conv2d(4, 4, 3, groups=2, bias=False), torch.randn(1, 4, 5, 5)),
    ],
)
def test_masked_twin_is_lossless_and_shares_tensors(host, x):
    host = host.double()
    x = x.double()
    cls = MaskedLinear if isinstance(host, nn.Linear) else MaskedConv2d
    m = cls.from_module(host)
    assert isinstance(m, type(host)) and type(m) is cls
    assert m.weight is host.weight and m.bias is host.bias
    assert m.weight_mask.dtype == torch.bool and bool(m.weight_mask.all())
    torch.testing.assert_close(m(x), host(x), rtol=0, atol=0)
    assert set(m.state_dict()) == set(host.state_dict()) | {"weight_mask"}
    assert "weight_mask" not in host.state_dict()  # the host is not changed


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_weights_have_no_effect_and_no_gradient(kind):
    torch.manual_seed(1)
    if kind == "linear":
        m, x = MaskedLinear(6, 4).double(), torch.randn(3, 6, dtype=torch.float64)
    else:
        m, x = MaskedConv2d(2, 3, 3).double(), torch.randn(2, 2, 5, 5, dtype=torch.float64)
    mask = torch.rand(m.weight.shape) > 0.5
    m.weight_mask.copy_(mask)
    y = m(x)
    w = m.weight.detach() * mask
    ref = F.linear(x, w, m.bias) if kind == "linear" else F.conv2d(x, w, m.bias)
    torch.testing.assert_close(y, ref)
    with torch.no_grad():  # changing masked raw weights changes nothing
        m.weight[~mask] = 1e6
    torch.testing.assert_close(m(x), ref)
    m(x).square().sum().backward()
    assert bool((m.weight.grad[~mask] == 0).all())
    assert bool((m.weight.grad[mask] != 0).any())


@pytest.mark.parametrize(("cls", "host"), [(MaskedLinear, nn.Linear), (MaskedConv2d, nn.Conv2d)])
def test_signature_parity_with_the_host(cls, host):
    def params(c):
        return [(p.name, p.default) for p in inspect.signature(c).parameters.values()]

    assert params(cls) == params(host)


def test_from_module_keeps_hooks_and_training_flag():
    host = nn.Linear(3, 2).eval()
    calls = []
    host.register_forward_hook(lambda mod, inp, out: calls.append(1))
    m = MaskedLinear.from_module(host)
    m(torch.randn(1, 3))
    assert calls == [1] and not m.training


def test_from_module_takes_exact_type_only():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(UnsupportedModuleError, match="MyLinear"):
        MaskedLinear.from_module(MyLinear(2, 2))
    with pytest.raises(UnsupportedModuleError):
        MaskedConv2d.from_module(nn.Linear(2, 2))


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

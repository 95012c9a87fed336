"""Lottery tickets: ``LotteryTicket``, ``imp``, ``reinit_``.

Invariants: a rewind restores exactly the saved values (θ0 or θ_k) of every kept weight, bias and BN buffer and
keeps the masks; pruned weights stay 0 through rewinds and training; after r rounds a layer has exactly
``round((1 - (1 - rate)^r) * n)`` weights pruned; the re-init control is fresh, seeded and keeps the masks.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynsparse import ConfigError, prune
from dynsparse.prune import LotteryTicket, imp, reinit_

torch.set_num_threads(1)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 4),
    )


def batch(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(model, steps=5, ticket=None, start=0):
    """Adam steps with a fresh optimizer (changes weights, biases and BN statistics); calls ``ticket.step``."""
    x, y = batch(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for t in range(start + 1, start + steps + 1):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ticket is not None:
            ticket.step(t)
    return loss.item()


def values(model):
    """Parameters and buffers without the masks, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")}


def count(fraction, n):
    return math.floor(fraction * n + 0.5)


def assert_masked_zero(model):
    for key, keep in prune.masks(model).items():
        weight = model.get_parameter(key)
        assert (weight[~keep] == 0).all(), f"{key}: pruned weights are not 0"


# ---------------------------------------------------------------- rewinding


@pytest.mark.parametrize("make", [mlp, cnn])
def test_rewind_restores_theta0_and_keeps_masks(make):
    model = make()
    theta0 = values(model)
    ticket = LotteryTicket(model)
    train(model)
    assert not torch.equal(values(model)["0.weight"], theta0["0.weight"])
    ticket.prune_().rewind_()
    keep = prune.masks(model)
    for name, value in values(model).items():
        if f"{name}" in keep:
            assert torch.equal(value[keep[name]], theta0[name][keep[name]]), name
            assert (value[~keep[name]] == 0).all(), name
        else:  # biases, BN weight / bias / running stats / num_batches_tracked
            assert torch.equal(value, theta0[name]), name


def test_pruned_weights_stay_zero_through_training_and_rewinds():
    model = mlp()
    ticket = LotteryTicket(model, rate=0.5)
    for _ in range(3):
        train(model)
        ticket.prune_()
        assert_masked_zero(model)
        ticket.rewind_()
        assert_masked_zero(model)
        before = prune.masks(model)
        train(model)
        assert_masked_zero(model)
        assert all(torch.equal(before[k], m) for k, m in prune.masks(model).items())


def test_late_rewind_snapshot_is_the_weights_at_step_k():
    model = mlp()
    ticket = LotteryTicket(model, rewind_step=3)
    assert ticket.snapshot_step is None
    with pytest.raises(ConfigError, match="rewind_step=3"):
        ticket.rewind_()
    train(model, steps=3, ticket=ticket)
    theta_k = values(model)
    train(model, steps=4, ticket=ticket, start=3)
    assert ticket.snapshot_step == 3
    ticket.prune_().rewind_()
    keep = prune.masks(model)
    for name, value in values(model).items():
        expected = theta_k[name] * keep[name] if name in keep else theta_k[name]
        assert torch.equal(value, expected), name
    train(model, steps=5, ticket=ticket, start=3)  # step 3 again in a later round: the snapshot is kept
    ticket.rewind_()
    assert torch.equal(values(model)["0.bias"], theta_k["0.bias"])


def test_explicit_snapshot_replaces_the_rewind_point():
    model = mlp()
    ticket = LotteryTicket(model)
    train(model)
    ticket.snapshot_(step=5)
    saved = values(model)
    train(model)
    ticket.rewind_()
    assert ticket.snapshot_step == 5
    assert all(torch.equal(v, saved[k]) for k, v in values(model).items())


# ---------------------------------------------------------------- pruning counts


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.35])
def test_each_round_reaches_the_compound_rate_per_layer_exactly(rate):
    model = mlp()
    ticket = LotteryTicket(model, rate=rate, rates={"4": 0.1})
    for r in range(1, 7):
        train(model, steps=2)
        ticket.prune_().rewind_()
        assert ticket.round == r
        for key, keep in prune.masks(model).items():
            p = 0.1 if key == "4.weight" else rate
            assert int((~keep).sum()) == count(1 - (1 - p) ** r, keep.numel()), (key, r)


def test_global_scope_ranks_the_rest_together_and_keeps_overrides_per_layer():
    model = mlp()
    ticket = LotteryTicket(model, rate=0.3, rates={"4": 0.1}, scope="global")
    for r in range(1, 4):
        train(model, steps=2)
        ticket.prune_().rewind_()
        keep = prune.masks(model)
        rest = [keep["0.weight"], keep["2.weight"]]
        n = sum(m.numel() for m in rest)
        assert sum(int((~m).sum()) for m in rest) == count(1 - 0.7**r, n)
        assert int((~keep["4.weight"]).sum()) == count(1 - 0.9**r, 150)
    layers = ticket.sparsity().layers
    assert layers["0.weight"] != layers["2.weight"]  # global ranking: the layers differ


def test_rate_override_zero_never_prunes_and_exclude_leaves_layers_alone():
    model = mlp()
    ticket = LotteryTicket(model, rate=0.5, rates={"4": 0.0}, exclude="2")
    ticket.prune_().prune_(0.2)
    s = ticket.sparsity()
    assert s.layers == {"0.weight": count(1 - 0.5 * 0.8, 480) / 480, "4.weight": 0.0}
    assert type(model[2]) is nn.Linear


def test_imp_driver_runs_rounds_and_late_rewinding():
    model = mlp()
    seen = []

    def train_fn(m, ticket):
        seen.append(ticket.round)
        start = ticket.rewind_step if ticket.round else 0
        return train(m, steps=4, ticket=ticket, start=start)

    out = imp(model, train_fn, rounds=3, rate=0.5, rates={"4": 0.2}, rewind_step=2)
    assert seen == [0, 1, 2, 3]
    assert [r.round for r in out.rounds] == [0, 1, 2, 3]
    assert out.rounds[0].sparsity == 0.0 and out.ticket.snapshot_step == 2
    assert out.rounds[-1].layers["0.weight"] == count(1 - 0.5**3, 480) / 480
    assert all(isinstance(r.result, float) for r in out.rounds)
    assert out.rounds[-1].sparsity == out.ticket.sparsity().overall


# ---------------------------------------------------------------- random re-init control


def test_reinit_is_fresh_seeded_and_keeps_masks():
    a = cnn()
    ticket = LotteryTicket(a, rate=0.5)
    train(a)
    ticket.prune_().rewind_()
    b = copy.deepcopy(a)
    rng = torch.get_rng_state()
    ticket.reinit_(seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    reinit_(b, seed=7)
    c = reinit_(copy.deepcopy(a), seed=8)
    assert all(torch.equal(v, values(b)[k]) for k, v in values(a).items())  # same seed, same values
    assert not torch.equal(values(a)["0.weight"], values(c)["0.weight"])
    theta0 = values(cnn())
    for key, keep in prune.masks(a).items():
        assert torch.equal(keep, prune.masks(ticket.model)[key])
        assert not torch.equal(a.get_parameter(key)[keep], theta0[key][keep])
    assert_masked_zero(a)


def test_reinit_custom_init_fn_and_warning(caplog):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.full((3,), 2.0))

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    reinit_(model, 0)
    assert "['1'] have parameters but no reset_parameters" in caplog.text
    assert torch.equal(model[1].alpha, torch.full((3,), 2.0))
    reinit_(model, 0, init_fn=lambda m: nn.init.zeros_(m[1].alpha))
    assert torch.equal(model[1].alpha, torch.zeros(3))


# ---------------------------------------------------------------- resume


def test_state_dict_round_trip_resumes_the_same_run():
    model = cnn()
    ticket = LotteryTicket(model, rate=0.4, rates={"5": 0.1}, rewind_step=2)
    train(model, steps=4, ticket=ticket)
    ticket.prune_().rewind_()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "ticket": ticket.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    other = cnn()
    prune.unstructured_(other, 0.0, layers=(nn.Linear, nn.Conv2d))  # masked twins, to load the *.weight_mask keys
    other.load_state_dict(saved["model"])
    resumed = LotteryTicket(other, rate=0.4, rates={"5": 0.1}, rewind_step=2)
    resumed.load_state_dict(saved["ticket"])
    assert resumed.round == 1 and resumed.snapshot_step == 2
    for t in (ticket, resumed):
        train(t.model, steps=3, start=2)
        t.prune_().rewind_()
    assert all(torch.equal(v, values(other)[k]) for k, v in values(model).items())
    assert all(torch.equal(m, prune.masks(other)[k]) for k, m in prune.masks(model).items())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, "0.2", True, None])
def test_bad_rates_raise(rate):
    if rate is not None:
        with pytest.raises(ConfigError, match="rate"):
            LotteryTicket(mlp(), rate=rate)
        with pytest.raises(ConfigError, match=r"rates\['4'\]"):
            LotteryTicket(mlp(), rates={"4": rate})
        with pytest.raises(ConfigError, match="rate"):
            LotteryTicket(mlp()).prune_(rate)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rates": {"fc9": 0.1}}, "'fc9' matches no pruned layer"),
        ({"rates": {3: 0.1}}, "rates keys"),
        ({"scope": "layers"}, "Did you mean 'layer'"),
        ({"rewind_step": -1}, "rewind_step"),
        ({"rewind_step": 2.5}, "rewind_step"),
        ({"include": "nothing*"}, "no prunable layer"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LotteryTicket(mlp(), **kwargs)


@pytest.mark.parametrize(("rounds", "train_fn"), [(-1, lambda m, t: None), (1.5, lambda m, t: None), (2, "train")])
def test_imp_bad_arguments_raise(rounds, train_fn):
    with pytest.raises(ConfigError, match="rounds" if train_fn != "train" else "train_fn"):
        imp(mlp(), train_fn, rounds=rounds)


def test_imp_late_rewind_without_step_calls_raises():
    with pytest.raises(ConfigError, match="rewind_step=5"):
        imp(mlp(), lambda m, t: train(m), rounds=1, rewind_step=5)


def test_structure_change_raises():
    model = mlp()
    ticket = LotteryTicket(model)
    ticket.prune_()
    model[2] = nn.Linear(40, 31)
    with pytest.raises(ConfigError, match=r"'2.weight' has shape \(31, 40\)"):
        ticket.rewind_()
    model[2] = nn.Identity()
    with pytest.raises(ConfigError, match="no longer matches"):
        ticket.rewind_()
    with pytest.raises(ConfigError, match="'2' is Identity"):
        ticket.prune_()


def test_load_state_dict_mismatch_raises():
    state = LotteryTicket(mlp(), rate=0.3).state_dict()
    with pytest.raises(ConfigError, match="saved ticket prunes"):
        LotteryTicket(mlp(), exclude="4").load_state_dict(state)
    with pytest.raises(ConfigError, match="rewind_step"):
        LotteryTicket(mlp(), rewind_step=4).load_state_dict(state)
    other = mlp()
    other[0] = nn.Linear(12, 41)
    other[2] = nn.Linear(41, 30)
    with pytest.raises(ConfigError, match="has shape"):
        LotteryTicket(other).load_state_dict(state)


def test_public_names():
    for name in ("LotteryTicket", "LotteryRound", "ImpResult", "imp", "reinit_"):
        assert name in prune.__all__ and getattr(prune, name) is not None

"""Masked weights stay zero through training: the optimizer hook, IterativePruner, the state dict, and the readers
of a masked weight (magnitude, wanda, BlockSparseLinear.from_linear)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynsparse as ds
from dynsparse import prune
from dynsparse.importance import magnitude, wanda

torch.set_num_threads(1)
X, Y = torch.randn(64, 16), torch.randint(0, 4, (64,))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()


def _revived(model) -> int:
    """Masked raw weights that are not 0."""
    return sum(int(m.weight.detach()[~m.weight_mask].ne(0).sum()) for m in model if hasattr(m, "weight_mask"))


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, 1e-2), lambda p: torch.optim.SGD(p, 0.1, 0.9)])
def test_reapply_masks_on_step_keeps_raw_weights_zero(make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    _train(model, opt, 2)  # optimizer state first: momentum / moments of weights about to be pruned
    prune.unstructured_(model, 0.7)
    handle = prune.reapply_masks_on_step(opt, model)
    _train(model, opt, 3)
    assert _revived(model) == 0
    handle.remove()
    _train(model, opt, 1)
    assert _revived(model) > 0  # without the hook the optimizer's state moves them: the hook did the work
    with pytest.raises(ds.ConfigError, match="reapply_masks_on_step"):
        prune.reapply_masks_on_step(model, opt)


def test_iterative_pruner_with_optimizer_keeps_raw_weights_and_state_dict_zero():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = functools.partial(prune.agp, initial=0.0, final=0.9, begin=0, end=20, frequency=5)
    pruner = prune.IterativePruner(model, schedule, scope="layer", optimizer=opt)
    for t in range(30):
        _train(model, opt, 1)
        pruner.step(t + 1)
    assert _revived(model) == 0 and prune.sparsity(model).overall == pytest.approx(0.9, abs=1e-3)
    sd = model.state_dict()
    assert float(sd["0.weight"].eq(0).float().mean()) == pytest.approx(0.9, abs=1e-3)
    pruner.step_hook.remove()


def test_state_dict_holds_the_masked_weight_even_when_the_raw_one_moved():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    prune.unstructured_(model, 0.5)
    _train(model, opt, 2)
    assert _revived(model) > 0  # no hook: the raw weights moved
    sd = model.state_dict()
    for i in (0, 2):
        mask = model[i].weight_mask
        assert torch.equal(sd[f"{i}.weight"], model[i].masked_weight().detach()) and not sd[f"{i}.weight"][~mask].any()
    assert model.state_dict(keep_vars=True)["0.weight"] is model[0].weight
    fresh = prune.unstructured_(_model(), 0.5)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(X), model(X))


def test_magnitude_and_wanda_read_the_masked_weight():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    prune.unstructured_(model, 0.5)
    _train(model, opt, 2)
    assert _revived(model) > 0
    for scores in (magnitude(model), wanda(model, [X])):
        for key, s in scores.items():
            mask = model.get_submodule(key.rpartition(".")[0]).weight_mask
            assert not s[~mask].any(), key


def test_block_sparse_from_a_revived_masked_linear_equals_the_masked_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 64)
    model(x).pow(2).mean().backward()
    opt.step()
    prune.apply_masks_(model, {"0.weight": prune.block_mask(model[0].weight.detach(), 16, 0.75)})
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
    assert _revived(model) > 0
    bsl = prune.BlockSparseLinear.from_linear(model[0], block=16, sparsity=None, force="dense")
    assert bsl.sparsity() == pytest.approx(0.75)
    torch.testing.assert_close(bsl(x), model(x))

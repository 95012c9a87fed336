"""FBS runners in eval: the per-block folded-BatchNorm cache follows every change of the norms, inference tensors
work, and per-input runs work under autograd (no ``out=``)."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.layers.channel_gating import FBSBlockMixin


def _model(strategy: str = "loop") -> torch.nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=10)
    ds.sparsify_(m, {"channels": {"gate": "fbs", "keep": 0.5, "strategy": strategy}})
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ == "FBSGate":
                mod.fc.weight.normal_(0, 0.5)  # decisions that differ between inputs
                mod.fc.bias.fill_(1.0)
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)  # no zero-initialised last norm
    return m.eval()


def _set(m: torch.nn.Module, strategy: str) -> None:
    for b in m.modules():
        if isinstance(b, FBSBlockMixin):
            b.strategy = strategy


def _against_masked(m: torch.nn.Module, x: torch.Tensor, strategy: str = "loop") -> float:
    """max |y - masked| / max |masked|."""
    _set(m, "masked")
    with torch.no_grad():
        ref = m(x)
    _set(m, strategy)
    with torch.no_grad():
        y = m(x)
    return float((y - ref).abs().max() / ref.abs().max())


def test_fold_cache_follows_running_statistics_updated_in_training():
    """BatchNorm updates its running statistics without bumping their version counters."""
    m, x = _model(), torch.randn(2, 3, 64, 64)
    assert _against_masked(m, x) < 1e-5  # fills the caches
    m.train()
    with torch.no_grad():  # re-estimate the statistics (BN recalibration)
        for _ in range(3):
            m(torch.randn(8, 3, 64, 64) * 3 + 1)
    m.eval()
    assert _against_masked(m, x) < 1e-5


def test_fold_cache_follows_changes_through_data():
    m, x = _model(), torch.randn(2, 3, 64, 64)
    assert _against_masked(m, x) < 1e-5
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.weight.data.mul_(1.7)
            bn.running_mean.data.add_(0.3)
    assert _against_masked(m, x) < 1e-5


def test_fold_cache_follows_eps_and_one_changed_norm():
    m, x = _model(), torch.randn(2, 3, 64, 64)
    assert _against_masked(m, x) < 1e-5
    norms = [bn for bn in m.modules() if isinstance(bn, torch.nn.BatchNorm2d)]
    norms[-1].eps = 0.5  # the last norm of the last block only
    assert _against_masked(m, x) < 1e-5
    with torch.no_grad():
        norms[-2].running_var[0] = 9.0  # one value of one norm
    assert _against_masked(m, x) < 1e-5


def test_inference_tensors_run():
    """A model moved inside inference mode holds inference tensors (no version counters)."""
    m, x = _model(), torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        m = m.to(torch.float32)
        m.apply(lambda mod: mod._apply(lambda t: t.clone()))
        assert next(m.parameters()).is_inference()
        _set(m, "masked")
        ref = m(x)
        _set(m, "loop")
        y = m(x)
        y2 = m(x)  # from the cache
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["loop", "group", "union", "auto"])
def test_per_input_runs_under_autograd(strategy):
    """Eval without no_grad (e.g. input gradients): the same outputs as masked, and a gradient reaches the input."""
    m = _model(strategy)
    x = torch.randn(3, 3, 64, 64, requires_grad=True)
    _set(m, "masked")
    ref = m(x)
    _set(m, strategy)
    y = m(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

"""Per-input neuron and head gates: regressions found in the second review (autocast, frozen models, empty batches,
predictor-training options)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from torch import nn

import dynsparse as ds
from dynsparse.errors import ConfigError
from dynsparse.layers.head_gating import gate_heads_, set_head_strategy_, train_head_predictors_
from dynsparse.layers.neuron_gating import (
    calibrate_neurons_,
    gate_neurons_,
    set_strategy_,
    train_predictors_,
)

HOSTS = {
    "mlp": lambda: Mlp(12, 40),
    "swiglu": lambda: SwiGLU(12, 40),
    "glu": lambda: GluMlp(12, 80, act_layer=nn.SiLU),
}
GATES = [("cats", "token"), ("dejavu", "token"), ("dejavu", "input")]
ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)


def _gated(host: str, gate: str, per: str, keep: float = 0.5, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(HOSTS[host]()).to(dtype).eval()
    gate_neurons_(m, gate, keep=keep, per=per)
    if gate == "cats":
        calibrate_neurons_(m, [torch.randn(4, 9, 12, dtype=dtype)])
    return m


def _heads(keep: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    m = gate_heads_(nn.Sequential(Attention(24, num_heads=4)).eval(), "dejavu", keep=keep)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m[0].heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **ARCH).eval()


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("gate,per", GATES)
def test_single_token_under_autocast_runs_like_a_batch(monkeypatch, kernels, host, gate, per):
    """One token under ``torch.autocast`` (mixed-precision decoding): the activations are bf16, the cached ``fc2``
    copy float32; the single-token path crashed in ``embedding_bag`` (or, through the compiled kernel, computed
    in float32 and returned float32 where every other path returns bf16)."""
    if kernels == "off":
        monkeypatch.setenv("DYNSPARSE_NO_KERNELS", "1")
    m = _gated(host, gate, per)
    x = torch.randn(1, 1, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        set_strategy_(m, "mask")
        want = m(x)
        set_strategy_(m, "auto")
        got = m(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("what", ["neurons", "heads"])
def test_predictors_train_in_a_frozen_model(what):
    """A host frozen with ``requires_grad_(False)`` (the usual way to freeze it) still gets its predictors trained
    (they crashed in ``backward``: no tensor required grad); the flags are left as they were."""
    m = ds.sparsify_(_vit(), {what: {"gate": "dejavu", "keep": 0.5}}).requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train = train_predictors_ if what == "neurons" else train_head_predictors_
    recall = train(m, [torch.randn(6, 3, 32, 32)], epochs=2)
    assert len(recall) == 2
    assert not any(p.requires_grad for p in m.parameters())
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".predictor." in k for k in changed), changed


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("gate,per", GATES)
@pytest.mark.parametrize("shape", [(0, 12), (0, 1, 12), (0, 9, 12), (2, 0, 12)])
def test_empty_batches_give_empty_outputs(host, gate, per, shape):
    m = _gated(host, gate, per)
    for strategy in ("auto", "gather", "union", "mask"):
        set_strategy_(m, strategy)
        with torch.no_grad():
            assert m(torch.randn(*shape)).shape == shape, strategy
    m.train()
    assert m(torch.randn(*shape)).shape == shape


@pytest.mark.parametrize("shape", [(0, 7, 24), (2, 0, 24)])
def test_empty_batches_through_head_gates(shape):
    m = _heads()
    for strategy in ("auto", "group", "mask"):
        set_head_strategy_(m, strategy)
        with torch.no_grad():
            assert m(torch.randn(*shape)).shape == shape, strategy


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"batch_size": 0}, {"max_rows": 0}, {"holdout": 1.0}, {"label_keep": 0.0}, {"label_keep": 1.5}],
)
def test_neuron_predictor_training_checks_its_options(bad):
    """As `train_head_predictors_` does: a bad number is named (it crashed in ``range()`` or returned a recall
    of -1 without training)."""
    m = ds.sparsify_(_vit(), {"neurons": {"gate": "dejavu", "keep": 0.5}})
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=f"train_predictors_: {name}"):
        train_predictors_(m, [torch.randn(2, 3, 32, 32)], **bad)


def test_cats_calibration_weighs_every_batch_when_it_subsamples():
    """More activations than ``max_samples``: the quantiles are of a uniform subsample of *all* batches. Each
    compaction used to draw from the earlier subsample and the new batch alike, so the last batches dominated: on
    three small-scale batches and one large-scale one, keep 0.5 kept 21 % of the calibration activations."""
    torch.manual_seed(0)
    m = gate_neurons_(nn.Sequential(Mlp(12, 40)).eval(), "cats", keep=0.5, max_samples=1000)
    data = [torch.randn(4, 50, 12) * s for s in (0.1, 0.1, 0.1, 1.0)]  # 8,000 activations per batch
    calibrate_neurons_(m, data)
    mlp = m[0]
    with torch.no_grad():
        kept = torch.cat([mlp.neurons(mlp.gate_activation(x.reshape(-1, 12))).flatten() for x in data]).float().mean()
    assert abs(kept.item() - 0.5) <= 0.03, f"kept {kept.item():.3f} of the calibration activations, target 0.5"


def test_dejavu_neurons_after_a_threshold_token_gate_are_refused_with_the_default_per():
    """Deja Vu decides per input by default: in the blocks where a threshold token gate packs the batch into one
    sequence, the whole batch would share one neuron set (silently). Refused, as with an explicit per='input'."""
    model = timm.create_model("test_vit", pretrained=False)
    ds.sparsify_(model, {"tokens": {"gate": "threshold", "blocks": [0]}})
    with pytest.raises(ds.ConfigError, match="neurons: "):
        gate_neurons_(model, gate="dejavu", keep=0.5)

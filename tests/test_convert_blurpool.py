"""Channel gates on timm conv blocks with BlurPool2d anti-aliasing convert exactly (the blur filter is sliced)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BlurPool2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

import dynsparse as ds

_BLOCKS = {
    "inverted_residual": lambda: InvertedResidual(8, 16, stride=2, exp_ratio=4.0, aa_layer=BlurPool2d),
    "edge_residual": lambda: EdgeResidual(8, 16, stride=2, exp_ratio=4.0, aa_layer=BlurPool2d),
    "dsconv": lambda: DepthwiseSeparableConv(8, 8, stride=2, aa_layer=BlurPool2d),  # timm sizes its aa by out_chs
    "basic_block": lambda: BasicBlock(
        8, 8, stride=2, aa_layer=BlurPool2d, downsample=nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 8, 1))
    ),
    "bottleneck": lambda: Bottleneck(
        8, 4, stride=2, aa_layer=BlurPool2d, downsample=nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1))
    ),
}


def _randomize_bn_(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)


@pytest.mark.parametrize("kind", sorted(_BLOCKS))
def test_blurpool_block_converts_exactly(kind: str) -> None:
    torch.manual_seed(0)
    stem = [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()] if kind == "dsconv" else []  # dw producer
    model = nn.Sequential(*stem, _BLOCKS[kind]()).eval()
    _randomize_bn_(model)
    ds.sparsify_(model, {"channels": "fixed"})
    gates = dict(ds.named_gates(model))
    assert gates, "no channel gate was placed"
    g = torch.Generator().manual_seed(0)
    ds.fix_gates_(model, {fqn: torch.rand(gate.num_units, generator=g) >= 0.4 for fqn, gate in gates.items()})
    x = torch.randn(2, 8, 16, 16)
    small = ds.convert(model, verify_inputs=x)  # raised a raw RuntimeError (unsliced blur filter) before the fix
    blur = [m for m in small.modules() if isinstance(m, BlurPool2d)]
    assert blur and all(b.filt.shape[0] == b.channels for b in blur if b.channels is not None)
    with torch.no_grad():
        diff = (model(x) - small(x)).abs().max().item()
    assert diff < 1e-5, f"max-abs difference {diff:.2e}"


@pytest.mark.parametrize("kind", sorted(_BLOCKS))
def test_cost_model_counts_the_sliced_blur_filter(kind: str) -> None:
    """The blur filter is sliced with the gated channels, so the gate's FLOPs scope covers it (``aa``)."""
    torch.manual_seed(0)
    stem = [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()] if kind == "dsconv" else []
    model = nn.Sequential(*stem, _BLOCKS[kind]()).eval()
    dense = ds.flops.count_flops(model, torch.zeros(1, 8, 16, 16))
    ds.sparsify_(model, {"channels": "fixed"})
    ds.fix_gates_(model, {fqn: torch.arange(g.num_units) % 4 == 0 for fqn, g in ds.named_gates(model)})
    x = torch.zeros(1, 8, 16, 16)
    predicted = ds.flops.CostModel(model, x).fraction()
    real = ds.flops.count_flops(ds.convert(model), x) / dense
    assert predicted == pytest.approx(real, rel=1e-6), f"cost model {predicted:.4f}, converted {real:.4f}"


def test_convert_refuses_a_model_that_fails_on_verify_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slicer that leaves a shape mismatch gives a DynsparseError from ``convert``, not a raw RuntimeError."""
    import dynsparse.layers.conv as conv

    monkeypatch.setattr(conv, "_slice_aa_", lambda *a, **k: None)  # the behaviour before the BlurPool2d fix
    model = nn.Sequential(_BLOCKS["inverted_residual"]()).eval()
    ds.sparsify_(model, {"channels": "fixed"})
    ds.fix_gates_(model, {"0.aa": torch.arange(32) < 20})
    with pytest.raises(ds.DynsparseError, match="fails on verify_inputs"):
        ds.convert(model, verify_inputs=torch.randn(1, 8, 16, 16))

"""Helpers shared by the regularizer tests (``test_regularizers_*.py``): tiny gated timm models, a close-check with
the max-abs difference in its message, and the sparse variational dropout KL of Molchanov et al. (2017) eq. 14 in
Python floats.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import Tensor, nn

import dynsparse as ds

# Paper constants, written out here rather than imported.
PAPER_K1, PAPER_K2, PAPER_K3 = 0.63576, 1.87320, 1.48695

# Gated blocks of timm's test_resnet: gate fqn -> (block, conv producing the channels, BN of the channels).
RESNET_GATES = {
    "layer1.0.act1.gate": ("layer1.0", "conv1", "bn1"),
    "layer2.0.act1.gate": ("layer2.0", "conv1", "bn1"),
    "layer3.0.act1.gate": ("layer3.0", "conv1", "bn1"),
    "layer3.0.act2.gate": ("layer3.0", "conv2", "bn2"),
    "layer4.0.act1.gate": ("layer4.0", "conv1", "bn1"),
}


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-12, rtol: float = 1e-10, what: str = "") -> None:
    """``torch.testing.assert_close`` with the max-abs difference in the message."""
    if not isinstance(expected, Tensor):
        expected = torch.tensor(expected, dtype=actual.dtype)
    expected = expected.to(actual.dtype)
    diff = (actual.detach() - expected).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(
        actual.detach(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: max abs diff {diff:.3g}\n{m}"
    )


def f64(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def tiny_vit(dims=("neurons", "heads"), gate="fixed", seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5).to(dtype).eval()
    return ds.sparsify_(model, {d: gate for d in dims})


def tiny_resnet(gate="fixed", seed=0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return ds.sparsify_(model, {"channels": gate})


def paper_kl(log_alpha: float) -> float:
    """KL from eq. 14: −KL ≈ k1·σ(k2 + k3·log α) − ½·log(1 + α⁻¹) − k1, in Python floats."""
    sig = 1.0 / (1.0 + math.exp(-(PAPER_K2 + PAPER_K3 * log_alpha)))
    neg_kl = PAPER_K1 * sig - 0.5 * math.log(1.0 + 1.0 / math.exp(log_alpha)) - PAPER_K1
    return -neg_kl


LOG_ALPHAS = [-8.0, -3.0, -1.0, 0.0, 0.5, 2.0, 3.0, 8.0]


def _moments_ok(samples: Tensor, mean: Tensor, var: Tensor, what: str) -> None:
    """Sample mean and variance within 5 standard errors of the closed form (Gaussian output)."""
    n = samples.shape[0]
    m_hat, v_hat = samples.mean(0), samples.var(0)
    assert ((m_hat - mean).abs() <= 5 * (var / n).sqrt()).all(), f"{what} mean {m_hat} vs {mean}"
    rel = (v_hat / var - 1).abs()
    assert (rel <= 5 * math.sqrt(2 / (n - 1))).all(), f"{what} var {v_hat} vs {var} (max rel {rel.max():.3g})"

"""Token gates and routers against their papers' equations, on tiny hand-computable tensors.

DynamicViT (Rao et al. 2021): policy softmax (Eq. 8-9, G_ij = 1 on the diagonal), cumulative hard Gumbel-softmax
decisions, ratio loss (Eq. 11: per input, mean over the batch, averaged over the S locations, times λ_ratio = 2).
EViT (Liang et al. 2022): class-token attention over the alive tokens only. LTP (Kim et al. 2022): soft mask
σ((s − θ)/T). The block router: straight-through Gumbel-sigmoid and ``weight · (mean p − target)²``.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import dynsparse as ds
from dynsparse.gates.routers import BlockRouter
from dynsparse.gates.tokens import PredictorTokenGate, ThresholdTokenGate, cls_attention
from dynsparse.layers.tokens import TokenGatedBlock, masked_attention


class _Attn(nn.Module):
    """One-head timm-like attention with q = k = 0 (uniform logits) and v = x: outputs are plain averages."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = 1, c, 1.0
        self.qkv = nn.Linear(c, 3 * c)
        self.q_norm = self.k_norm = self.norm = self.attn_drop = self.proj_drop = self.proj = nn.Identity()
        with torch.no_grad():
            self.qkv.weight.zero_()
            self.qkv.bias.zero_()
            self.qkv.weight[2 * c :] = torch.eye(c)


def test_policy_softmax_lets_a_dropped_token_attend_to_itself_and_the_kept_ones():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    out = masked_attention(_Attn().double(), x, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), eps=0.0)
    kept_rows = (x[0, 0] + x[0, 2]) / 2  # kept queries: uniform over the kept keys {0, 2}
    dropped_row = x[0].mean(0)  # dropped query 1: G_11 = 1, so keys {0, 1, 2}
    expected = torch.stack([kept_rows, dropped_row, kept_rows])
    torch.testing.assert_close(out[0], expected)


def test_policy_softmax_eps_term_matches_the_reference():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]], dtype=torch.float64)
    eps, n = 1e-2, 3
    out = masked_attention(_Attn().double(), x, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64), eps=eps)
    # (exp·G + eps/N) / (Σ exp·G + eps) with exp = 1 (uniform logits after the max subtraction)
    w_kept = torch.tensor([1 + eps / n, eps / n, 1 + eps / n], dtype=torch.float64) / (2 + eps)
    torch.testing.assert_close(out[0, 0], w_kept @ x[0])


def _predictor(dim: int = 8) -> PredictorTokenGate:
    torch.manual_seed(0)
    return PredictorTokenGate(4, keep=0.5, dim=dim).double().train()


def test_ratio_loss_is_per_input_then_batch_mean():
    g = _predictor()
    g.target = 0.5
    g._ratio = torch.tensor([1.0, 0.0], dtype=torch.float64)  # one input keeps all, one none: batch mean = target
    # Eq. 11: λ/B Σ_b (ρ − mean_i D_i^b)² = 2 · ((0.5² + 0.5²) / 2) = 0.5 (the square of the batch mean gives 0)
    assert float(g.penalty()) == pytest.approx(0.5)


def _vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2, num_classes=3)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args)


def test_ratio_loss_is_averaged_over_the_locations_with_cumulative_targets():
    m = ds.layers.gate_tokens_(_vit(), "predictor", blocks=[0, 1, 2], keep=0.5).double().train()
    gates = [b.tokens.gate for b in m.blocks if isinstance(b, TokenGatedBlock)]
    assert [g.locations for g in gates] == [3, 3, 3]
    assert [g.target for g in gates] == pytest.approx([0.5, 0.25, 0.125])
    m(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    expected = sum(((g._ratio - g.target) ** 2).mean() for g in gates) * 2.0 / 3
    torch.testing.assert_close(ds.penalty(m), expected)


def test_gumbel_decisions_are_hard_cumulative_and_straight_through():
    g = _predictor()
    P, n = 2, 6  # two prefix tokens (class + register), six patch tokens
    x = torch.randn(3, P + n, 8, dtype=torch.float64)
    prev = torch.ones(3, P + n, dtype=torch.float64)
    prev[:, P : P + 3] = 0  # dropped at an earlier stage
    pol = g.sample(x, P, prev)
    assert torch.equal(pol[:, :P], prev[:, :P])  # prefix tokens always kept
    assert set(pol.unique().tolist()) <= {0.0, 1.0}
    assert (pol[:, P : P + 3] == 0).all()  # dropped once, dropped for good
    torch.testing.assert_close(g._ratio, pol[:, P:].mean(1))  # fraction of the original patch tokens, no prefix
    g.penalty().backward()
    assert g.out_conv[-2].weight.grad.abs().sum() > 0  # straight-through: the hard decisions carry a gradient


def test_predictor_global_feature_is_the_policy_weighted_mean():
    g = _predictor()
    t = torch.randn(1, 4, 8, dtype=torch.float64)
    pol = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # dropped tokens do not move the global feature: the kept tokens score as if they were alone (gathered)
    torch.testing.assert_close(g.log_probs(t, pol)[:, :2], g.log_probs(t[:, :2], None))


def test_cls_attention_with_a_policy_equals_the_gathered_tokens():
    torch.manual_seed(0)
    attn = _vit(embed_dim=8).blocks[0].attn.double()
    h = torch.randn(2, 5, 8, dtype=torch.float64)
    pol = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    s = cls_attention(h, attn, 1, pol)
    assert (s[:, [1, 3]] == 0).all()  # dropped tokens score 0
    torch.testing.assert_close(s[:, [0, 2]], cls_attention(h[:, [0, 1, 3]], attn, 1))
    torch.testing.assert_close(s.sum(1) + _cls_self(h, attn, pol), torch.ones(2, dtype=torch.float64))  # one row


def _cls_self(h, attn, pol):
    """The class token's attention to itself under ``pol`` (the rest of its row is over the kept patches)."""
    B, N, _ = h.shape
    q, k, _ = attn.qkv(h).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q[:, :, :1] * attn.scale @ k.transpose(-2, -1)).masked_fill(pol[:, None, None] == 0, -math.inf)
    return logits.softmax(-1)[..., 0].mean((1, 2))


def test_ltp_soft_mask_and_threshold_gradient():
    g = ThresholdTokenGate(4, threshold=1.0, temperature=0.5).double()
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    m = g.soft_mask(s)
    torch.testing.assert_close(m, torch.sigmoid((s - 1.0) / 0.5))
    m.sum().backward()
    # d/dθ σ((s − θ)/T) = −σ(1 − σ)/T
    torch.testing.assert_close(g.threshold.grad, -(m * (1 - m)).sum().detach() / 0.5)


def test_router_straight_through_and_budget_loss():
    r = BlockRouter(4, target=0.25, weight=2.0).double().train()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    d = r(x)
    assert set(d.unique().tolist()) <= {0.0, 1.0}
    p = r.logits(x).sigmoid()
    torch.testing.assert_close(r.penalty(), 2.0 * (p.mean() - 0.25) ** 2)
    d.sum().backward()
    assert r.proj.bias.grad is not None and r.proj.bias.grad != 0
    r.eval()
    torch.testing.assert_close(r(x)[:, 0], (r.logits(x) >= 0).double())  # keep = 0.5: p ≥ 0.5

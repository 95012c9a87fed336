"""Token gates: regressions found in review (head-gated scores vs the converted model, LTP training edge cases)."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**ARCH, **kw}).eval()


def _x(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "tokens",
    [
        {"gate": "cls_attention", "keep": 0.5},
        {"gate": "cls_attention", "keep": 0.5, "fuse": True},
        {"gate": "threshold", "threshold": 1.0},
    ],
)
def test_closed_heads_take_no_part_in_the_token_scores(tokens):
    """Scores averaged over heads leave out the heads a ``heads`` gate closes: the converted model (which has
    no such heads) makes the same token decisions, so its output equals the gated model's."""
    m = ds.sparsify_(_vit(), {"heads": {"gate": "fixed"}, "tokens": {"blocks": [1, 3], **tokens}}).double()
    for i in (1, 3):
        m.blocks[i].attn.norm.gate.mask.copy_(torch.tensor([True, False, True, False]))
    x = _x()
    with torch.no_grad():
        want = m(x)
        small = ds.convert(m, static=False)
        assert small.blocks[1].attn.num_heads == 2
        got = small(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_threshold_training_when_no_token_arrives_above_half():
    """A later gate's running score table skips a batch whose soft policy keeps no token above 0.5 (no crash)."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "threshold", "blocks": [1, 3]}})
    with torch.no_grad():
        m.blocks[1].tokens.gate.threshold.fill_(50.0)  # above every score: every soft mask of block 1 is ~0
    m.train()
    m(_x(2).float()).sum().backward()
    assert int(m.blocks[3].tokens.gate.calibrated) == 0 and int(m.blocks[1].tokens.gate.calibrated) == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"gate": "predictor", "keep": [0.5, 1.5]},  # the second block's keep is refused
        {"gate": "cls_attention", "keep": [0.5, 0.0]},
    ],
)
def test_a_refused_spec_leaves_the_model_unchanged(kw):
    """`gate_tokens_` is all or nothing: a gate refused at a later block leaves no token gate behind, so the
    corrected call succeeds."""
    from dynsparse.layers.tokens import gate_tokens_

    m = _vit()
    with pytest.raises(ds.DynsparseError, match="keep"):
        gate_tokens_(m, blocks=[1, 3], **kw)
    assert all(type(b) is timm.models.vision_transformer.Block for b in m.blocks)
    gate_tokens_(m, blocks=[1, 3], gate=kw["gate"], keep=0.5)


def test_keep_given_in_the_gate_dict_is_used():
    """``gate={"gate": ..., "keep": k}`` keeps ``k`` (it was silently replaced by the default 0.7)."""
    from dynsparse.layers.tokens import gate_tokens_

    m = gate_tokens_(_vit(), gate={"gate": "predictor", "keep": 0.5, "tau": 0.5}, blocks=[1])
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": 0.5} and m.blocks[1].tokens.gate.tau == 0.5
    m = gate_tokens_(_vit(), gate={"gate": "cls_attention", "keep": 0.5}, blocks=[1], keep=0.25)
    assert ds.get_budget(m) == {"blocks.1.tokens.gate": 0.25}  # the argument wins
    with pytest.raises(ds.ConfigError, match="needs a class token"):  # refused when built, not at the first forward
        gate_tokens_(_vit(class_token=False, global_pool="avg"), gate={"gate": "cls_attention"}, blocks=[1])

"""Token gates, second review: refusals that name the problem, state kept consistent across calls."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.layers.tokens import TokenGatedBlock, calibrate_tokens_

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7)


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **{**ARCH, **kw}).eval()


def _x(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cls_attention_needs_a_class_token_not_a_register():
    """Without a class token, the first prefix token is a register: its attention is not EViT's score."""
    m = _vit(class_token=False, reg_tokens=2, global_pool="avg")
    with pytest.raises(ds.ConfigError, match="needs a class token"):
        ds.sparsify_(m, {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    assert all(type(b) is timm.models.vision_transformer.Block for b in m.blocks)
    ds.sparsify_(m, {"tokens": {"gate": "threshold", "blocks": [1]}})  # the threshold gate needs no class token


@pytest.mark.parametrize("gate", ["cls_attention", "predictor", "threshold"])
def test_an_attention_mask_is_refused_by_name_on_the_gathered_path(gate):
    """Gathering changes the token count under a mask made for all tokens (a shape error deep in a later block)."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": gate, "blocks": [1, 3]}})
    mask = torch.ones(3, 1, 65, 65, dtype=torch.bool)
    with torch.no_grad(), pytest.raises(ds.ConfigError, match="attention mask"):
        m(_x(), attn_mask=mask)


@pytest.mark.parametrize("gate", ["predictor", "threshold"])
def test_an_empty_training_batch_has_a_zero_penalty(gate):
    """An empty batch leaves no penalty behind: not NaN (predictor), not the last batch's freed graph (threshold)."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": gate, "blocks": [1, 3]}}).train()
    (m(_x()).sum() + ds.penalty(m)).backward()
    y = m(_x(0))
    p = ds.penalty(m)
    assert float(p.detach()) == 0.0
    (y.sum() + p).backward()


def test_calibration_runs_on_the_masked_reference_path():
    """calibrate_tokens_ collects the scores on the masked path too (it crashed on an empty list)."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "threshold", "blocks": [1, 3], "threshold": 1.0}}).double()
    ref = calibrate_tokens_(copy.deepcopy(m), _x(4).double())
    for b in m.blocks:
        if isinstance(b, TokenGatedBlock):
            b.tokens.mask_inference = True
    calibrate_tokens_(m, _x(4).double())
    for i in (1, 3):
        torch.testing.assert_close(m.blocks[i].tokens.gate.table, ref.blocks[i].tokens.gate.table)


@pytest.mark.parametrize("on", [1, 3])
@pytest.mark.parametrize("tokens", [{"gate": "cls_attention", "keep": 0.5}, {"gate": "threshold", "threshold": 1.0}])
def test_mask_inference_on_some_blocks_only_is_refused(tokens, on):
    """Masked and gathered blocks in one forward resurrect dropped tokens (or crash): refused by name."""
    m = ds.sparsify_(_vit(), {"tokens": {"blocks": [1, 3], **tokens}})
    m.blocks[on].tokens.mask_inference = True
    with torch.no_grad(), pytest.raises(ds.ConfigError, match="mask_inference"):
        m(_x())


@pytest.mark.parametrize("gate", ["predictor", "threshold"])
def test_gradient_checkpointing_of_the_masked_path_is_refused(gate):
    """A recomputed block would read the shared keep policy of the end of the forward: wrong gradients, refused."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": gate, "blocks": [1, 3]}}).train()
    m.set_grad_checkpointing(True)
    y = m(_x())
    with pytest.raises(ds.ConfigError, match="checkpointing"):
        (y.sum() + ds.penalty(m)).backward()


def test_gradient_checkpointing_of_the_gathered_path_still_trains():
    """cls_attention trains on gathered tokens: no shared state, so checkpointing gives the same gradients."""
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1, 3], "keep": 0.5}}).train()
    c = copy.deepcopy(m)
    c.set_grad_checkpointing(True)
    for model in (m, c):
        model(_x()).sum().backward()
    for (name, p), q in zip(m.named_parameters(), c.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_calibrate_tokens_restores_each_modules_training_flag():
    """A submodule kept in eval on purpose (a frozen norm) stays in eval after calibration of a training model."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    ds.sparsify_(model, {"tokens": {"gate": "threshold", "blocks": [1]}})
    model.train()
    model.norm.eval()
    calibrate_tokens_(model, torch.randn(2, 3, 160, 160))
    assert model.training and not model.norm.training and model.blocks[0].training


@pytest.mark.parametrize("gate", ["threshold", "cls_attention"])
def test_a_pooling_changed_after_the_token_gates_is_refused(gate):
    """The blocks lay the tokens out for the pooling the model had when the gates were set; reset_classifier with
    another global_pool afterwards pooled padding or dropped tokens silently. Refused by name; a deepcopy too."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    ds.sparsify_(model, {"tokens": {"gate": gate, "blocks": [1]}})
    x = torch.randn(2, 3, 160, 160)
    model(x)  # the pooling it was set for
    twin = copy.deepcopy(model)
    for m in (model, twin):
        m.reset_classifier(7, global_pool="avg")
        with pytest.raises(ds.ConfigError, match=r"global_pool='avg', but its token gates were set for 'token'"):
            m(x)

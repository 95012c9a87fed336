"""Whole-model tests on tiny timm models: sparsify_ with open gates gives the original output."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.layers import GateSlot

torch.set_num_threads(1)

SMALL_VIT = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
# (id, model name, kwargs, dimensions, input size)
MODELS = [
    ("vit", "test_vit", {}, ("neurons", "heads", "layers"), 32),
    ("vit_layerscale", "test_vit2", {}, ("neurons", "heads", "layers"), 32),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", SMALL_VIT, ("neurons", "heads", "layers"), 32),
    (
        "vit_reg_tokens",
        "vit_tiny_patch16_224",
        dict(SMALL_VIT, reg_tokens=4, no_embed_class=True),
        ("neurons", "heads", "layers"),
        32,
    ),
    (
        "vit_qknorm_swiglu",
        "vit_tiny_patch16_224",
        dict(SMALL_VIT, qk_norm=True, mlp_layer=timm.layers.SwiGLU, init_values=1e-2),
        ("neurons", "heads", "layers"),
        32,
    ),
    ("resnet", "test_resnet", {}, ("channels", "layers"), 32),
    ("resnet18", "resnet18", dict(num_classes=5), ("channels", "layers"), 32),
    ("convnext", "test_convnext", {}, ("neurons", "layers"), 32),
    ("convnext_conv_mlp", "convnext_atto", dict(conv_mlp=True, num_classes=5), ("neurons", "layers"), 32),
    ("efficientnet", "test_efficientnet", {}, ("channels",), 32),
    ("efficientnet_b0", "efficientnet_b0", dict(num_classes=5), ("channels", "layers"), 32),
    ("mobilenetv3", "mobilenetv3_small_050", dict(num_classes=5), ("channels", "layers"), 32),
    (
        "swin",
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5),
        ("neurons", "layers"),
        32,
    ),
]
IDS = [m[0] for m in MODELS]


def _make(name, kwargs, dtype=torch.float64):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).to(dtype).eval()


@pytest.mark.parametrize(("mid", "name", "kwargs", "dims", "size"), MODELS, ids=IDS)
def test_open_gates_give_original_output(mid, name, kwargs, dims, size):
    model = _make(name, kwargs)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    ds.sparsify_(model, {d: {"gate": "hard_concrete"} for d in dims})
    assert model.training is False
    gated_dims = {m.dimension for m in model.modules() if isinstance(m, GateSlot)}
    assert gated_dims == set(dims)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-10)
    # only *.gate.* keys are new; the host checkpoint loads
    new = set(model.state_dict()) - set(ref.state_dict())
    assert new and all(".gate." in k for k in new)
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert set(missing) == new and not unexpected
    # forward_features / forward_head keep working
    torch.testing.assert_close(model.forward_head(model.forward_features(x)), ref(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("mid", "name", "kwargs", "dims", "size"), MODELS, ids=IDS)
def test_gated_model_trains(mid, name, kwargs, dims, size):
    model = _make(name, kwargs, dtype=torch.float32).train()
    ds.sparsify_(model, {d: {"gate": "hard_concrete"} for d in dims})
    x = torch.randn(2, 3, size, size)
    out = model(x)
    pen = ds.penalty(model)
    assert pen.ndim == 0 and pen.requires_grad
    (out.logsumexp(-1).mean() + 1e-3 * pen).backward()
    gates = list(ds.named_gates(model))
    assert gates
    for fqn, g in gates:
        for p in g.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), fqn


def test_vit_small_spec_from_the_issue():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=16)
    out = ds.sparsify_(
        model,
        {"neurons": {"gate": "hard_concrete"}, "heads": {"gate": "hard_concrete"}, "layers": {"gate": "hard_concrete"}},
    )
    assert out is model
    names = [fqn for fqn, _ in ds.named_gates(model)]
    assert names[:4] == [
        "blocks.0.attn.norm.gate",
        "blocks.0.drop_path1.gate",
        "blocks.0.mlp.norm.gate",
        "blocks.0.drop_path2.gate",
    ]
    assert type(model.blocks[0].attn).__name__ == "GatedAttention"
    assert model.blocks[0].attn.norm.gate.num_units == 6


def test_swin_heads_is_refused_with_fqn_and_skip_lists_them(caplog):
    kwargs = dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5)
    model = _make("swin_tiny_patch4_window7_224", kwargs)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'layers\.0\.blocks\.0\.attn' \(WindowAttention\)"):
        ds.sparsify_(model, {"heads": {"gate": "hard_concrete"}, "neurons": {"gate": "hard_concrete"}})
    assert not list(ds.named_gates(model))  # nothing was changed
    plan = ds.plan_sparsify(model, {"heads": "hard_concrete", "neurons": "hard_concrete"})
    assert [s.fqn for s in plan.skipped] == ["layers.0.blocks.0.attn", "layers.1.blocks.0.attn"]
    with caplog.at_level("WARNING"):
        ds.sparsify_(model, {"heads": "hard_concrete", "neurons": "hard_concrete"}, on_unsupported="skip")
    assert "layers.1.blocks.0.attn" in caplog.text
    assert {m.dimension for m in model.modules() if isinstance(m, GateSlot)} == {"neurons"}


TINY_ATTN = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2, num_classes=5)
# (model name, kwargs, {fqn: class} of the attention modules that cannot take head gates)
ATTENTION_LOOKALIKES = [
    (
        "cait_xxs24_224",
        dict(TINY_ATTN, depth_token_only=1),
        {
            "blocks.0.attn": "TalkingHeadAttn",
            "blocks.1.attn": "TalkingHeadAttn",
            "blocks_token_only.0.attn": "ClassAttn",
        },
    ),
    ("vit_small_patch16_rope_224", TINY_ATTN, {"blocks.0.attn": "AttentionRope", "blocks.1.attn": "AttentionRope"}),
    (
        "eva02_tiny_patch14_224",
        dict(TINY_ATTN, patch_size=14, img_size=28),
        {f"blocks.{i}.attn": "EvaAttention" for i in (0, 1)},
    ),
    (
        "test_maxvit",
        {},
        {"stages.0.blocks.0.attn_block.attn": "AttentionCl", "stages.0.blocks.0.attn_grid.attn": "AttentionCl"},
    ),
    ("test_coatnet", {}, {"stages.2.blocks.0.attn": "Attention2d"}),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "lookalikes"), ATTENTION_LOOKALIKES, ids=[c[0] for c in ATTENTION_LOOKALIKES]
)
def test_attention_classes_without_head_gates_are_reported(name, kwargs, lookalikes, caplog):
    """Any attention class (not only names ending in 'Attention') that cannot take head gates is named, never a
    bare 'nothing can be gated'; blocks built around one (CaiT's LayerScaleBlockClassAttn) are not."""
    model = _make(name, kwargs, dtype=torch.float32)
    skipped = {s.fqn: s.module_type for s in ds.plan_sparsify(model, {"heads": "sigmoid"}).skipped}
    assert {f: skipped[f] for f in lookalikes if f in skipped} == lookalikes, skipped
    assert set(skipped.values()) == set(lookalikes.values()), skipped
    first = next(iter(skipped))
    with pytest.raises(ds.UnsupportedModuleError, match=rf"'{first}' \({skipped[first]}\)"):
        ds.sparsify_(model, {"heads": "sigmoid"})
    with caplog.at_level("WARNING", logger="dynsparse.sparsify"):
        ds.sparsify_(model, {"heads": "sigmoid"}, on_unsupported="skip")
    assert all(f"{f} ({c}) for 'heads'" in caplog.text for f, c in lookalikes.items()), caplog.text
    assert not list(ds.named_gates(model))


def test_attention_lookalike_next_to_plain_attention_is_reported(caplog):
    """A ViT with an attention-pool head: the blocks' Attention is gated, the AttentionPoolLatent is named."""
    model = _make("test_vit", dict(global_pool="map"), dtype=torch.float32)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'attn_pool' \(AttentionPoolLatent\)"):
        ds.sparsify_(model, {"heads": "sigmoid"})
    with caplog.at_level("WARNING", logger="dynsparse.sparsify"):
        ds.sparsify_(model, {"heads": "sigmoid"}, on_unsupported="skip")
    assert "attn_pool (AttentionPoolLatent) for 'heads'" in caplog.text
    assert type(model.blocks[0].attn).__name__ == "GatedAttention"
    assert type(model.attn_pool).__name__ == "AttentionPoolLatent"


def test_convnext_channels_points_to_neurons():
    model = _make("test_convnext", {})
    with pytest.raises(ds.UnsupportedModuleError, match="use the 'neurons' dimension"):
        ds.sparsify_(model, {"channels": "hard_concrete"})


def test_model_without_candidates_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ds.UnsupportedModuleError, match="no module of the model can be gated"):
        ds.sparsify_(model, {"neurons": "hard_concrete"})

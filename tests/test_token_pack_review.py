"""Review of the packed token path (`dynsparse.layers.token_pack`): edge cases and error messages."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=5, num_heads=4, num_classes=7)


def test_a_wrong_attention_mode_is_a_config_error_naming_the_field():
    """A typo in ``_token_state.attention`` names the field it came from, as a ConfigError."""
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, **ARCH).eval()
    ds.sparsify_(m, {"tokens": {"gate": "threshold", "blocks": [1], "threshold": 1.0}})
    m.blocks[1]._token_state.attention = "pads"
    with pytest.raises(ds.ConfigError, match=r"_token_state\.attention.*'pads'"), torch.no_grad():
        m(torch.randn(2, 3, 32, 32))

"""Tiny model files for the CLI tests: a gated checkpoint and its converted model, with and without ``data``."""

from __future__ import annotations

import torch

import dynsparse as ds

ARCH = {
    "library": "timm",
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2,
               "num_heads": 2},
}  # fmt: skip
DATA = {
    "dataset": "digits",
    "image_size": None,
    "channels": None,
    "input_shape": [1, 8, 8],
    "mean": [0.3056],
    "std": [0.3763],
}


def gated_model() -> torch.nn.Module:
    """The tiny ViT with fixed gates: half the heads, a quarter of the MLP neurons and block 0's MLP closed."""
    from dynsparse.convert.io import build_host

    torch.manual_seed(0)
    model = build_host(ARCH).eval()
    ds.sparsify_(model, {"heads": {"gate": "fixed"}, "neurons": {"gate": "fixed"}, "layers": {"gate": "fixed"}})
    masks = {}
    for fqn, g in ds.named_gates(model):
        keep = torch.ones(g.num_units, dtype=torch.bool)
        if fqn.endswith("attn.norm.gate"):
            keep[: g.num_units // 2] = False
        elif fqn.endswith("mlp.norm.gate"):
            keep[: g.num_units // 4] = False
        elif fqn == "blocks.0.drop_path2.gate":
            keep[:] = False
        masks[fqn] = keep
    return ds.fix_gates_(model, masks)


def write_files(tmp_path, data: dict | None = DATA) -> tuple:
    """``(gated.safetensors, model.safetensors)`` of `gated_model` in ``tmp_path``; ``data=None``: an old-style file."""
    model = gated_model()
    gated = ds.save_gated(model, tmp_path / "gated.safetensors", arch=ARCH, data=data)
    converted = ds.save(ds.convert(model), tmp_path / "model.safetensors", arch=ARCH, data=data)
    return gated, converted

"""A sweep over more timm architectures: every dimension either converts exactly or is refused by name, untouched.

For each architecture and dimension, ``sparsify_`` with fixed gates and random keep masks either raises a
`DynsparseError` naming a module (and leaves the model as it was), or ``convert`` gives a smaller model whose
outputs equal the gated model's, and which ``save`` / ``load`` round-trips.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.resnet import BasicBlock
from torch import nn

import dynsparse as ds

torch.set_num_threads(1)

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
# (model name, kwargs, input size, {dimension: "ok" or a regex the refusal must match})
ZOO = [
    ("resnet10t", {}, 32, {"channels": "ok", "layers": "ok"}),
    ("seresnet18", {}, 32, {"channels": "ok", "layers": "ok"}),
    ("resnetaa34d", {}, 32, {"channels": "ok", "layers": "ok"}),
    ("ecaresnet26t", {}, 32, {"channels": "ok"}),
    ("skresnet18", {}, 32, {"heads": r"'layer1\.0\.conv1\.attn' \(SelectiveKernelAttn\)"}),
    ("regnetx_002", {}, 32, {"layers": r"'s1\.b1' \(Bottleneck\)"}),
    ("mobilenetv2_050", {}, 32, {"channels": "ok", "layers": "ok"}),
    ("lcnet_050", {}, 32, {"channels": "ok"}),
    ("mnasnet_050", {}, 32, {"channels": "ok", "layers": "ok"}),
    ("tf_mobilenetv3_small_minimal_100", {}, 32, {"channels": "ok"}),
    ("mixnet_s", {}, 32, {"channels": r"'blocks\.0\.0' \(DepthwiseSeparableConv\)", "layers": "ok"}),
    ("test_efficientnet_gn", {}, 32, {"channels": r"\(EdgeResidual\): bn1 is a GroupNormAct"}),
    ("ghostnet_050", {}, 32, {"channels": r"'blocks\.1\.0' \(GhostBottleneck\)"}),
    (
        "mobilenetv4_conv_medium",
        {},
        32,
        {"channels": r"'blocks\.1\.0' \(UniversalInvertedResidual\)", "layers": r"\(UniversalInvertedResidual\)"},
    ),
    ("resnetv2_50", {}, 32, {"channels": r"\(PreActBottleneck\)"}),
    ("convnextv2_atto", {}, 32, {"neurons": r"\(GlobalResponseNormMlp\)", "layers": "ok"}),
    ("poolformer_s12", {}, 32, {"neurons": "ok", "layers": r"\(MetaFormerBlock\)"}),
    ("deit3_small_patch16_224", TINY_VIT, 32, {"neurons": "ok", "heads": "ok", "layers": "ok"}),
    ("beit_base_patch16_224", TINY_VIT, 32, {"neurons": "ok", "heads": r"'blocks\.0\.attn' \(Attention\)"}),
    ("cait_xxs24_224", TINY_VIT, 32, {"neurons": "ok", "layers": r"'blocks\.0' \(LayerScaleBlock\)"}),
    ("pit_ti_224", dict(img_size=64), 64, {"neurons": "ok", "heads": "ok", "layers": "ok"}),
    ("mobilevit_xxs", {}, 64, {"neurons": "ok", "heads": "ok"}),
    ("mixer_s16_224", dict(img_size=64), 64, {"neurons": "ok"}),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32, {"neurons": "ok"}),
    ("coat_lite_tiny", dict(img_size=64), 64, {"neurons": "ok"}),
    # CoaT's parallel blocks call one Mlp object as mlp2, mlp3 and mlp4
    (
        "coat_tiny",
        dict(img_size=64),
        64,
        {"neurons": r"'parallel_blocks\.0\.mlp2' \(Mlp\).*as 'parallel_blocks\.0\.mlp3'"},
    ),
]
CASES = [(name, kw, size, dim, want) for name, kw, size, dims in ZOO for dim, want in dims.items()]


def _make(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _random_masks(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if gate.num_units == 1:
            masks[fqn] = torch.rand(1, generator=g) >= 0.3
        else:
            masks[fqn] = torch.rand(gate.num_units, generator=g) < torch.rand(1, generator=g).clamp(0.1, 0.9)
    return masks


def _snapshot(model: nn.Module):
    return [(f, type(m)) for f, m in model.named_modules()], copy.deepcopy(model.state_dict())


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize(("name", "kwargs", "size", "dim", "want"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_zoo(name, kwargs, size, dim, want, tmp_path):
    model = _make(name, kwargs)
    x = torch.randn(2, 3, size, size)
    if want != "ok":
        before = _snapshot(model)
        with pytest.raises(ds.DynsparseError, match=want):
            ds.sparsify_(model, {dim: {"gate": "fixed"}})
        assert _same(before, _snapshot(model)), "a refused sparsify_ changed the model"
        return
    ds.sparsify_(model, {dim: {"gate": "fixed"}})
    ds.fix_gates_(model, _random_masks(model))
    ref = model(x)
    converted = ds.convert(model, verify_inputs=x)
    torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in converted.parameters()) < sum(p.numel() for p in model.parameters())
    path = ds.save(converted, tmp_path / "m.safetensors", arch={"name": name, "kwargs": dict(kwargs, num_classes=5)})
    assert torch.equal(ds.load(path)(x), converted(x))


class _TwoCalls(nn.Module):
    """Calls one module object twice, under two names (as CoaT's ``mlp2 = mlp3 = mlp4``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.a = self.b = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize(
    ("inner", "dim", "x"),
    [(Mlp(8, 16), "neurons", torch.randn(2, 8)), (BasicBlock(8, 8), "layers", torch.randn(2, 8, 5, 5))],
    ids=["mlp-neurons", "basicblock-layers"],
)
def test_module_called_under_two_names_is_refused(inner, dim, x):
    """A gate on a shared module would be sliced at one name only: convert gave a silently wrong model."""
    model = _TwoCalls(inner).eval()
    before = _snapshot(model)
    with pytest.raises(ds.UnsupportedModuleError, match=r"'a' .*also called as 'b'"):
        ds.sparsify_(model, {dim: "fixed"})
    assert _same(before, _snapshot(model))
    ds.sparsify_(model, {dim: "fixed"}, on_unsupported="skip")
    assert not list(ds.named_gates(model))


def test_a_features_only_model_reading_features_with_hooks_is_refused():
    """timm's feature hooks (feature_location='expansion') read tensors inside blocks: any gate there would change a
    returned feature map, which conversion could not follow. Refused before the model changes."""
    model = timm.create_model("efficientnet_b0", features_only=True, feature_location="expansion", pretrained=False)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ds.UnsupportedModuleError, match="forward hooks"):
        ds.sparsify_(model, {"channels": {"gate": "fixed"}})
    assert [type(m) for m in model.modules()] == before

"""Whole-model conversion on tiny timm models of every supported family, with random masks in every dimension."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import dynsparse as ds

torch.set_num_threads(1)

SMALL_VIT = dict(img_size=32, patch_size=8, depth=3, num_classes=5)
MODELS = [
    ("vit", "test_vit", {}, ("neurons", "heads", "layers")),
    ("vit_layerscale", "test_vit2", {}, ("neurons", "heads", "layers")),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", SMALL_VIT, ("neurons", "heads", "layers")),
    (
        "vit_reg_tokens",
        "vit_tiny_patch16_224",
        dict(SMALL_VIT, reg_tokens=4, no_embed_class=True),
        ("neurons", "heads", "layers"),
    ),
    (
        "vit_qknorm_swiglu",
        "vit_tiny_patch16_224",
        dict(SMALL_VIT, qk_norm=True, mlp_layer=timm.layers.SwiGLU, init_values=1e-2),
        ("neurons", "heads", "layers"),
    ),
    ("resnet", "test_resnet", {}, ("channels", "layers")),
    ("convnext", "test_convnext", {}, ("neurons", "layers")),
    ("convnext_conv_mlp", "convnext_atto", dict(conv_mlp=True, num_classes=5), ("neurons", "layers")),
    ("efficientnet_b0", "efficientnet_b0", dict(num_classes=5), ("channels", "layers")),
    ("mobilenetv3", "mobilenetv3_small_050", dict(num_classes=5), ("channels", "layers")),
    (
        "swin",
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5),
        ("neurons", "layers"),
    ),
]
IDS = [m[0] for m in MODELS]


def _gated(name, kwargs, dims, seed=0, close_layers=0.3):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ds.sparsify_(model, {d: {"gate": "fixed"} for d in dims})
    g = torch.Generator().manual_seed(seed + 1)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if gate.num_units == 1:  # a branch gate
            masks[fqn] = torch.rand(1, generator=g) >= close_layers
        else:
            masks[fqn] = torch.rand(gate.num_units, generator=g) < torch.rand(1, generator=g).clamp(0.1, 0.9)
    ds.fix_gates_(model, masks)
    return model


def _host_classes_only(model: nn.Module) -> list[str]:
    bad = []
    for fqn, m in model.named_modules():
        mod = type(m).__module__
        if not (mod.startswith(("timm.", "torch.")) or type(m) is ds.ZeroBranch):
            bad.append(f"{fqn}: {type(m).__module__}.{type(m).__name__}")
    return bad


@pytest.mark.parametrize(("mid", "name", "kwargs", "dims"), MODELS, ids=IDS)
def test_convert_whole_model(mid, name, kwargs, dims, tmp_path):
    model = _gated(name, kwargs, dims)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    converted = ds.convert(model, verify_inputs=x)
    # input untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(ds.named_gates(model))
    # outputs equal within float32 tolerance; only host classes remain
    torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)
    assert _host_classes_only(converted) == []
    assert type(converted) is type(model)
    assert sum(p.numel() for p in converted.parameters()) < sum(p.numel() for p in model.parameters())
    # run-time attributes are right: forward_features / forward_head keep working
    torch.testing.assert_close(converted.forward_head(converted.forward_features(x)), ref, rtol=1e-4, atol=1e-5)
    # save -> load round trip gives identical outputs
    path = (
        ds.save(converted, tmp_path / "m.safetensors", arch={"name": name, "kwargs": kwargs_json(kwargs)})
        if _json_ok(kwargs)
        else None
    )
    if path is not None:
        loaded = ds.load(path)
        assert torch.equal(loaded(x), converted(x))
    # plan replay on a fresh host gives the same shapes
    fresh = ds.apply_plan(timm.create_model(name, pretrained=False, **kwargs), converted.slice_plan)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()
    }


def _json_ok(kwargs) -> bool:
    return all(isinstance(v, (int, float, str, bool, tuple, list, type(None))) for v in kwargs.values())


def kwargs_json(kwargs):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def test_vit_attributes_after_conversion():
    model = _gated("test_vit", {}, ("heads", "neurons"))
    c = ds.convert(model)
    for blk_g, blk_c in zip(model.blocks, c.blocks, strict=True):
        kept = int(blk_g.attn.norm.gate.keep_mask().sum())
        assert blk_c.attn.num_heads == max(kept, 1)
        assert blk_c.attn.attn_dim == blk_c.attn.num_heads * blk_c.attn.head_dim
        assert type(blk_c.attn) is timm.layers.Attention and type(blk_c.mlp) is timm.layers.Mlp
        assert blk_c.mlp.fc1.out_features == max(int(blk_g.mlp.norm.gate.keep_mask().sum()), 1)


def test_closed_branches_remove_blocks_and_branches():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL_VIT).eval()
    ds.sparsify_(model, {"layers": "fixed"})
    closed = torch.tensor([False])
    ds.fix_gates_(
        model,
        {"blocks.1.drop_path1.gate": closed, "blocks.1.drop_path2.gate": closed, "blocks.2.drop_path2.gate": closed},
    )
    x = torch.randn(2, 3, 32, 32)
    c = ds.convert(model, verify_inputs=x)
    assert isinstance(c.blocks[1], nn.Identity)
    assert isinstance(c.blocks[2].mlp, ds.ZeroBranch) and type(c.blocks[2].attn) is timm.layers.Attention
    assert sum(p.numel() for p in c.blocks[2].parameters()) < sum(p.numel() for p in model.blocks[2].parameters())


def test_resnet_closed_branch_keeps_shortcut():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    ds.sparsify_(model, {"layers": "fixed"})
    ds.fix_gates_(
        model, {"layer2.0.drop_path.gate": torch.tensor([False]), "layer3.1.drop_path.gate": torch.tensor([False])}
    )
    x = torch.randn(2, 3, 32, 32)
    c = ds.convert(model, verify_inputs=x)
    assert isinstance(c.layer2[0], nn.Sequential)  # downsample + ReLU
    assert isinstance(c.layer3[1], nn.ReLU)


def test_non_binary_branch_value_is_folded():
    model = timm.create_model("test_vit2", pretrained=False).eval()  # LayerScale
    ds.sparsify_(model, {"layers": "hard_concrete"})
    with torch.no_grad():
        model.blocks[0].drop_path1.gate.log_alpha.fill_(0.5)
    v = float(model.blocks[0].drop_path1.gate.eval_values().detach())
    assert 0 < v < 1
    x = torch.randn(1, 3, 32, 32)
    ds.convert(model, verify_inputs=x, atol=1e-5)


def test_torch_export_of_converted_models():
    for name, kwargs, dims in [("test_vit", {}, ("heads", "neurons", "layers")), ("test_resnet", {}, ("channels",))]:
        c = ds.convert(_gated(name, kwargs, dims))
        x = torch.randn(2, 3, 32, 32)
        ep = torch.export.export(c, (x,))
        torch.testing.assert_close(ep.module()(x), c(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the 'export' extra (onnx, onnxscript, onnxruntime)")
    ort = pytest.importorskip("onnxruntime", reason="needs the 'export' extra")
    c = ds.convert(_gated("test_vit", {}, ("heads", "neurons", "layers")))
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "m.onnx"
    torch.onnx.export(c, (x,), str(path), dynamo=True, verbose=False)
    sess = ort.InferenceSession(str(path))
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), c(x).detach(), rtol=1e-4, atol=1e-4)


def test_static_refuses_input_dependent_gates():
    class Router(ds.InputDependentGate):
        def forward(self, x):
            return torch.ones(x.shape[0], self.num_units)

    model = nn.Sequential(nn.Linear(3, 3))
    model.router = Router(3)
    with pytest.raises(ds.ConfigError, match=r"input-dependent gates.*router"):
        ds.convert(model)


def test_verify_raises_with_max_abs_difference():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ds.DynsparseError, match="max-abs difference"):
        ds.verify(a, b, torch.randn(4, 3))
    assert ds.verify(a, a, torch.randn(4, 3)) == 0.0


def test_save_load_errors_name_file_and_tensor(tmp_path):
    c = ds.convert(_gated("test_vit", {}, ("heads", "neurons")))
    path = ds.save(c, tmp_path / "m.safetensors")
    # damaged file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ds.DynsparseError, match=r"bad\.safetensors"):
        ds.load(bad)
    # a tensor with the wrong shape
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["blocks.0.mlp.fc2.weight"] = tensors["blocks.0.mlp.fc2.weight"][:, :1].contiguous()
    save_file(tensors, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ds.DynsparseError, match=r"shape\.safetensors: tensor 'blocks\.0\.mlp\.fc2\.weight'"):
        ds.load(tmp_path / "shape.safetensors")
    # a missing tensor
    del tensors["blocks.0.mlp.fc2.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(ds.DynsparseError, match=r"'blocks\.0\.mlp\.fc2\.weight' is missing"):
        ds.load(tmp_path / "missing.safetensors")
    # a plan of another version
    meta2 = dict(meta, plan=meta["plan"].replace('"version":1', '"version":99'))
    save_file({k: v for k, v in tensors.items()}, str(tmp_path / "v.safetensors"), metadata=meta2)
    with pytest.raises(ds.ConfigError, match="unsupported plan version 99"):
        ds.load(tmp_path / "v.safetensors")


def test_save_refuses_wrong_arch_and_gated_models(tmp_path):
    model = _gated("deit_tiny_patch16_224", SMALL_VIT, ("heads",))
    with pytest.raises(ds.ConfigError, match="still has gates"):
        ds.save(model, tmp_path / "x.safetensors")
    c = ds.convert(model)
    with pytest.raises(ds.ConfigError, match="do not rebuild this model"):
        ds.save(c, tmp_path / "x.safetensors")  # created with kwargs the default arch does not know
    assert not (tmp_path / "x.safetensors").exists()
    ds.save(c, tmp_path / "x.safetensors", arch={"name": "deit_tiny_patch16_224", "kwargs": SMALL_VIT})


def test_save_is_atomic(tmp_path, monkeypatch):
    c = ds.convert(_gated("test_vit", {}, ("neurons",)))
    path = ds.save(c, tmp_path / "m.safetensors")
    good = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ds.save(c, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_gated_checkpoint_round_trip_and_cli(tmp_path):
    model = _gated("test_resnet", {}, ("channels", "layers"))
    ck = ds.save_gated(model, tmp_path / "ck.safetensors")
    loaded, info = ds.load_gated(ck)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    assert info["arch"]["name"] == "test_resnet"
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "dynsparse.cli", "convert", str(ck), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "parameters:" in res.stdout and "max-abs difference" in res.stdout
    c = ds.load(out / "model.safetensors")
    torch.testing.assert_close(c(x), model(x), rtol=1e-4, atol=1e-5)
    assert (out / "plan.json").exists()


@pytest.mark.parametrize(
    ("name", "kwargs", "dims"),
    [("test_resnet", {}, ("channels",)), ("efficientnet_b0", dict(num_classes=5), ("channels",))],
    ids=["resnet", "efficientnet_b0"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_convert_keeps_memory_format(name, kwargs, dims, channels_last):
    """Sliced weights are fresh dense tensors in the layout of the weights they replace (no views, no mixed layouts)."""
    model = _gated(name, kwargs, dims, close_layers=0.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    ref = model(x)
    converted = ds.convert(model)
    before = sum(p.numel() for p in model.parameters() if p.ndim == 4)
    assert sum(p.numel() for p in converted.parameters() if p.ndim == 4) < before, "nothing was sliced"
    off = [
        f"{n} {tuple(p.shape)} strides {p.stride()}"
        for n, p in converted.named_parameters()
        if p.ndim == 4 and not p.is_contiguous(memory_format=fmt)
    ]
    assert off == [], f"convert changed the layout of: {off}"
    assert all(p.storage_offset() == 0 for p in converted.parameters()), "a converted parameter is a view"
    torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", [0.0, -0.5, 0.3])
@pytest.mark.parametrize(
    ("name", "kwargs", "slot", "branch"),
    [
        ("deit_tiny_patch16_224", SMALL_VIT, "blocks.0.drop_path1", "blocks.0.attn"),
        ("test_resnet", {}, "layer1.0.drop_path", "layer1.0.conv2"),
    ],
    ids=["vit", "resnet"],
)
def test_branch_kept_by_its_mask_is_kept_whatever_its_value(tmp_path, name, kwargs, slot, branch, value):
    """The mask decides what a layers gate keeps (as in the plan); its value, even 0 or negative, is folded."""
    torch.manual_seed(0)
    model = ds.sparsify_(timm.create_model(name, pretrained=False, **kwargs).eval(), {"layers": "fixed"})
    gate = model.get_submodule(f"{slot}.gate")
    with torch.no_grad():
        gate.values.fill_(value)
    assert gate.keep_mask().tolist() == [True]
    x = torch.randn(2, 3, 32, 32)
    small = ds.convert(model, verify_inputs=x)
    assert small.slice_plan.entries[slot] == {"layers": [0]}
    assert type(small.get_submodule(branch)).__name__ != "ZeroBranch"
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch={"name": name, "kwargs": kwargs}))
    torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-5)


def test_save_mismatch_error_gives_both_shapes(tmp_path):
    model = ds.sparsify_(timm.create_model("test_vit", pretrained=False).eval(), {"neurons": "fixed"})
    ds.fix_gates_(model, {"blocks.0.mlp.norm": torch.arange(192) < 10})
    small = ds.convert(model)
    with pytest.raises(ds.ConfigError, match=r"fc1\.bias., rebuilt \(192,\), model \(10,\).*changed after convert"):
        ds.save(small, tmp_path / "m.safetensors", plan=ds.SlicePlan())


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ("blocks.1.0", r"'blocks\.1\.0' \(InvertedResidual\): conv_pw is a MixedConv2d, not an nn\.Conv2d"),
        ("blocks.2.0", r"'blocks\.2\.0' \(InvertedResidual\): conv_dw is a MixedConv2d, not an nn\.Conv2d"),
    ],
)
def test_mixnet_split_convs_are_refused_when_gating(block, match):
    """A MixedConv2d anywhere the slicer would cut is refused by sparsify_, not left to crash convert."""
    model = timm.create_model("mixnet_s", pretrained=False, num_classes=5).eval()
    with pytest.raises(ds.UnsupportedModuleError, match=match):
        ds.sparsify_(model, {"channels": "fixed"}, include=block)


def test_mixnet_on_unsupported_skip_does_not_crash_and_converts():
    torch.manual_seed(0)
    model = timm.create_model("mixnet_s", pretrained=False, num_classes=5).eval()
    ds.sparsify_(model, {"channels": "fixed"}, on_unsupported="skip")
    for fqn, g in ds.named_gates(model):
        ds.fix_gates_(model, {fqn: torch.arange(g.num_units) % 2 == 0})
    ds.convert(model, verify_inputs=torch.randn(1, 3, 64, 64))


def test_converted_model_is_in_eval_mode_throughout():
    """The stand-ins of removed branches (ZeroBranch, Identity) are in eval mode like the rest of the model."""
    model = _gated("test_vit", {}, ("layers",), close_layers=0.7).train()
    converted = ds.convert(model)
    assert any(type(m) is ds.ZeroBranch for m in converted.modules())
    assert [f for f, m in converted.named_modules() if m.training] == []

"""save / load and save_gated / load_gated: what a round trip must keep, and damaged metadata fields."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dynsparse as ds

torch.set_num_threads(1)
ARCH = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5),
}


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]).eval()


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def _rewrite(path, out, **fields: str):
    """Copy the safetensors file ``path`` to ``out`` with metadata ``fields`` replaced."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(out), metadata={**meta, **fields})
    return out


# ---- gate settings outside the state dict ----------------------------------------------------------------------


def test_load_gated_restores_topk_k(tmp_path):
    model = ds.sparsify_(_vit(), {"neurons": {"gate": "topk", "keep": 1.0}})
    for _, g in ds.named_gates(model):
        torch.nn.init.normal_(g.scores)
        g.set_k_(keep=0.25)
    back, _ = ds.load_gated(ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH))
    assert [g.k for _, g in ds.named_gates(back)] == [g.k for _, g in ds.named_gates(model)] == [32, 32]
    assert torch.equal(back.eval()(_x()), model(_x()))
    assert ds.convert(back).blocks[0].mlp.fc1.out_features == 32


def test_load_gated_restores_a_run_time_budget(tmp_path):
    model = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.7}})
    ds.set_budget_(model, keep=0.25)
    back, _ = ds.load_gated(ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH))
    assert ds.get_budget(back) == {"blocks.1.tokens.gate": 0.25}


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ("[]", r"'settings' must be a JSON object"),
        ('{"blocks.0.mlp.norm.gate": {"k": 999}}', r"'settings' entry 'blocks\.0\.mlp\.norm\.gate': .*k must be"),
        ('{"blocks.0.mlp.norm.gate": {"keep": 0.5}}', r"'blocks\.0\.mlp\.norm\.gate': the rebuilt model has no gate"),
        ('{"nope.gate": {"k": 1}}', r"'nope\.gate': the rebuilt model has no gate"),
        ('{"blocks.0.mlp.norm.gate": 3}', r"expected an object with 'k' or 'keep'"),
    ],
)
def test_bad_settings_field_names_file_and_gate(tmp_path, settings, match):
    model = ds.sparsify_(_vit(), {"neurons": "topk"})
    path = ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH)
    bad = _rewrite(path, tmp_path / "bad.safetensors", settings=settings)
    with pytest.raises(ds.DynsparseError, match=r"bad\.safetensors: .*" + match):
        ds.load_gated(bad)


def test_checkpoint_without_settings_field_still_loads(tmp_path):
    """Checkpoints written before the field existed load with the spec's settings."""
    model = ds.sparsify_(_vit(), {"neurons": "topk"})
    path = ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "settings"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    back, _ = ds.load_gated(tmp_path / "old.safetensors")
    assert torch.equal(back.eval()(_x()), model(_x()))


# ---- the run-time budget of a converted model --------------------------------------------------------------------


def test_save_records_the_budget_at_save_time(tmp_path):
    model = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.7}})
    small = ds.convert(model, static=False)
    ds.set_budget_(small, keep=0.25)
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch=ARCH))
    assert ds.get_budget(back) == {"blocks.1.tokens.gate": 0.25}
    assert back.slice_plan.dynamic["tokens"]["keep"] == [0.25]
    assert torch.equal(back(_x()), small(_x()))
    assert small.slice_plan.dynamic["tokens"]["keep"] == [0.7], "save must not change the model's plan"


# ---- dtypes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_load_keeps_the_saved_dtype(tmp_path, dtype):
    model = ds.sparsify_(_vit(), {"neurons": "fixed"})
    ds.fix_gates_(model, {"blocks.0.mlp.norm": torch.arange(128) < 50})
    small = ds.convert(model).to(dtype)
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch=ARCH))
    assert {p.dtype for p in back.parameters()} == {dtype}
    for k, v in small.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k  # exact: no round trip through float32
    assert torch.equal(back(_x(dtype)), small(_x(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_gated_keeps_the_saved_dtype(tmp_path, dtype):
    model = ds.sparsify_(_vit(), {"neurons": "hard_concrete"}).to(dtype)
    back, _ = ds.load_gated(ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH))
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert torch.equal(back.eval()(_x(dtype)), model(_x(dtype)))


def test_load_keeps_mixed_dtypes_per_tensor(tmp_path):
    model = ds.sparsify_(_vit(), {"neurons": "fixed"})
    small = ds.convert(model).to(torch.bfloat16)
    small.norm.float()  # e.g. a norm kept in float32
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch=ARCH))
    assert {k: v.dtype for k, v in back.state_dict().items()} == {k: v.dtype for k, v in small.state_dict().items()}


# ---- damaged metadata ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("arch", "[]", r"metadata field 'arch' must be a JSON object, got list"),
        ("arch", '"test_vit"', r"metadata field 'arch' must be a JSON object, got str"),
        ("arch", "{}", r"metadata field 'arch': arch: field 'name'"),
        ("arch", '{"name": "test_vit", "kwargs": []}', r"arch: cannot build timm model 'test_vit'"),
    ],
)
def test_damaged_arch_raises_dynsparse_error_naming_the_file(tmp_path, field, value, match):
    small = ds.convert(ds.sparsify_(_vit(), {"neurons": "fixed"}))
    path = ds.save(small, tmp_path / "m.safetensors", arch=ARCH)
    bad = _rewrite(path, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(ds.DynsparseError, match=r"bad\.safetensors: " + match):
        ds.load(bad)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("arch", "[]", r"'arch' must be a JSON object"),
        ("history", "{}", r"'history' must be a JSON array"),
        ("history", "[3]", r"'history' entry 0 must be an object with a 'spec'"),
        ("gates", "[]", r"'gates' must be a JSON object"),
        ("extra", '"x"', r"'extra' must be a JSON object"),
    ],
)
def test_damaged_gated_metadata_names_the_file_and_field(tmp_path, field, value, match):
    path = ds.save_gated(ds.sparsify_(_vit(), {"neurons": "fixed"}), tmp_path / "g.safetensors", arch=ARCH)
    bad = _rewrite(path, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(ds.DynsparseError, match=r"bad\.safetensors: metadata field " + match):
        ds.load_gated(bad)


def test_metadata_is_plain_json(tmp_path):
    path = ds.save_gated(ds.sparsify_(_vit(), {"neurons": "topk"}), tmp_path / "g.safetensors", arch=ARCH)
    with safe_open(str(path), framework="pt") as f:
        settings = json.loads(f.metadata()["settings"])
    assert settings == {f"blocks.{i}.mlp.norm.gate": {"k": 128} for i in range(2)}


# ---- a converted model pruned and converted again ----------------------------------------------------------------


@pytest.mark.parametrize("second", ["neurons", "heads"])
def test_save_of_a_model_converted_twice_loads(tmp_path, second):
    # the second convert's plan was relative to the first conversion, and save refused the model; convert now
    # composes the two plans, relative to the host (more cases in test_convert_twice.py)
    model = _vit()
    ds.prune.structured_(model, {"neurons": 0.5})
    once = ds.convert(model)
    ds.save(once, tmp_path / "once.safetensors", arch=ARCH)
    ds.prune.structured_(once, {second: 0.5})
    twice = ds.convert(once, verify_inputs=_x())
    loaded = ds.load(ds.save(twice, tmp_path / "twice.safetensors", arch=ARCH))
    assert torch.equal(loaded(_x()), twice(_x()))
    assert twice.slice_plan.units["blocks.0.mlp.norm"] == 128


def test_converted_file_without_plan_names_the_field(tmp_path):
    """A damaged converted file without its plan says so (was: 'plan: not valid JSON (Expecting value ...)')."""
    small = ds.convert(ds.sparsify_(_vit(), {"neurons": "fixed"}))
    path = ds.save(small, tmp_path / "m.safetensors", arch=ARCH)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "plan"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ds.DynsparseError, match=r"bad\.safetensors: metadata field 'plan' is missing"):
        ds.load(tmp_path / "bad.safetensors")

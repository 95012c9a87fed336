"""Third review of the converter: load errors name the file and field, non-JSON arch kwargs and extra data name
their key, and further edge cases found in review."""

from __future__ import annotations

import functools
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


def _converted() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]).eval()
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
    ds.fix_gates_(
        model,
        {
            "blocks.0.mlp.norm": torch.arange(128) % 3 != 0,
            "blocks.1.attn.norm": torch.tensor([False, True]),
            "blocks.1.drop_path1": torch.tensor([False]),
        },
    )
    return ds.convert(model)


def _edit_plan(src, out, edit) -> str:
    """Copy the model file ``src`` to ``out`` with its plan metadata passed through ``edit`` (a dict -> None)."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    plan = json.loads(meta["plan"])
    edit(plan)
    save_file(tensors, str(out), metadata={**meta, "plan": json.dumps(plan)})
    return str(out)


def _drop_units(plan: dict, fqn: str) -> None:
    plan["units"].pop(fqn)


PLAN_EDITS = {  # edits SlicePlan accepts on its own; only replaying the plan on the rebuilt host finds them wrong
    "index out of range, no unit count": lambda p: (
        p["entries"]["blocks.1.attn.norm"]["heads"].__setitem__(0, 5),
        _drop_units(p, "blocks.1.attn.norm"),
    ),
    "unit count of another architecture": lambda p: p["units"].__setitem__("blocks.0.mlp.norm", 256),
    "entry for a module the host lacks": lambda p: p["entries"].__setitem__("blocks.5.mlp.norm", {"neurons": [1]}),
    "dimension the module has no slicer for": lambda p: p["entries"].__setitem__("blocks.0.mlp.norm", {"heads": [0]}),
    "a dynamic part that does not fit": lambda p: p.__setitem__("dynamic", {"tokens": {"blocks": "x"}}),
}


@pytest.mark.parametrize("case", sorted(PLAN_EDITS))
def test_load_names_the_file_and_the_plan_field_when_the_plan_does_not_replay(tmp_path, case):
    good = ds.save(_converted(), tmp_path / "m.safetensors", arch=ARCH)
    bad = _edit_plan(good, tmp_path / "bad.safetensors", PLAN_EDITS[case])
    with pytest.raises(ds.ConfigError) as e:
        ds.load(bad)
    assert str(bad) in str(e.value) and "'plan'" in str(e.value), str(e.value)


def test_load_gated_names_the_file_when_its_plan_does_not_replay(tmp_path):
    small = _converted()
    ds.sparsify_(small, {"neurons": "fixed"})
    good = ds.save_gated(small, tmp_path / "g.safetensors", arch=ARCH)
    bad = _edit_plan(good, tmp_path / "bad.safetensors", lambda p: p["units"].__setitem__("blocks.0.mlp.norm", 256))
    with pytest.raises(ds.ConfigError) as e:
        ds.load_gated(bad)
    assert str(bad) in str(e.value) and "'plan'" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("value", "what"),
    [(torch.nn.GELU, "type"), (functools.partial(torch.nn.LayerNorm, eps=1e-6), "partial"), (print, "builtin")],
)
def test_save_names_the_arch_kwarg_that_is_not_json(tmp_path, value, what):
    arch = {"name": ARCH["name"], "kwargs": {**ARCH["kwargs"], "act_layer": value}}
    with pytest.raises(ds.ConfigError, match=r"arch: kwargs\['act_layer'\]") as e:
        ds.save(_converted(), tmp_path / "m.safetensors", arch=arch)
    assert what in str(e.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_save_names_a_nested_arch_kwarg_that_is_not_json(tmp_path):
    arch = {"name": ARCH["name"], "kwargs": {**ARCH["kwargs"], "block_args": {"layers": [1, torch.nn.ReLU]}}}
    with pytest.raises(ds.ConfigError, match=r"arch: kwargs\['block_args'\]\['layers'\]\[1\]"):
        ds.save(_converted(), tmp_path / "m.safetensors", arch=arch)


def test_save_gated_names_extra_not_the_sparsify_spec_when_extra_is_not_json(tmp_path):
    torch.manual_seed(0)
    model = ds.sparsify_(timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]), {"neurons": "fixed"})
    with pytest.raises(ds.ConfigError, match=r"save_gated: extra\['metric'\]") as e:
        ds.save_gated(model, tmp_path / "g.safetensors", arch=ARCH, extra={"step": 3, "metric": torch.tensor(0.5)})
    assert "sparsify spec" not in str(e.value)
    assert not (tmp_path / "g.safetensors").exists()


def _converted_with(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"], **extra).eval()
    ds.sparsify_(model, {"neurons": "fixed"})
    return ds.convert(ds.fix_gates_(model, {"blocks.0.mlp.norm": torch.arange(128) < 60}))


def test_save_refuses_arch_kwargs_that_rebuild_other_layers_of_the_same_shapes(tmp_path):
    small = _converted_with(act_layer="relu")  # same shapes as the default GELU: the file loaded a GELU model
    with pytest.raises(ds.ConfigError, match=r"do not rebuild this model \(first mismatch: module 'blocks.0.mlp.act'"):
        ds.save(small, tmp_path / "m.safetensors", arch=ARCH)
    assert not (tmp_path / "m.safetensors").exists()
    arch = {"name": ARCH["name"], "kwargs": {**ARCH["kwargs"], "act_layer": "relu"}}
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch=arch))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), small(x))


def test_save_accepts_arch_kwargs_that_differ_only_in_training_noise(tmp_path):
    small = _converted_with(drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)  # no-ops in eval
    back = ds.load(ds.save(small, tmp_path / "m.safetensors", arch=ARCH))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), small(x))


@pytest.mark.parametrize("uniform", [False, True])
def test_convert_of_a_model_on_meta_names_the_gate(uniform):
    with torch.device("meta"):
        model = timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]).eval()
        ds.sparsify_(model, {"neurons": "fixed"})
    with pytest.raises(ds.ConfigError, match=r"'blocks.0.mlp.norm.gate' is on the meta device"):
        ds.convert(model, uniform=uniform)
    with pytest.raises(ds.ConfigError, match=r"make_plan: .*'blocks.0.mlp.norm.gate' is on the meta device"):
        ds.make_plan(model)


def test_save_accepts_a_batchnorm_momentum_changed_for_fine_tuning(tmp_path):
    """BatchNorm's momentum only steers training statistics: a model fine-tuned with another one saves."""
    from torch import nn

    model = timm.create_model("test_resnet", pretrained=False).eval()
    ds.sparsify_(model, {"channels": {"gate": "fixed"}})
    small = ds.convert(model)
    for m in small.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.01
    path = ds.save(small, tmp_path / "m.safetensors", arch={"name": "test_resnet"})
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ds.load(path)(x), small(x))

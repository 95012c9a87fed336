"""The recipe's ``device``: resolution and validation, CPU-only checkpoints, CUDA runs (on a machine with a GPU).

The CUDA tests cover every code path a recipe can take on the GPU (gates, regularizers, pruning methods and
scores, dynamic gates, sensitivity) and the device independence of checkpoints (trained on one device, resumed
on the other); they are skipped where ``torch.cuda.is_available()`` is false.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dynsparse.recipes import RecipeError, parse_recipe
from dynsparse.recipes.device import resolve_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VIT = """\
name: dev
seed: 2
device: DEVICE
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 3, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 128}
stages:
  - {name: dense, epochs: 1}
  - name: gates
    epochs: 1
    sparsify: {heads: {gate: hard_concrete}, neurons: {gate: hard_concrete}, layers: {gate: hard_concrete}}
    regularizers: [{name: budget, target: 0.5, lr: 0.05}]
    gate_optimizer: {name: adam, lr: 0.05}
    distill: {weight: 1.0}
    enforce_budget: true
  - {name: finetune, epochs: 1, fix_gates: true}
evaluate: {latency: false}
"""


def _recipe(text: str = VIT, device: str = "cpu"):
    return parse_recipe(yaml.safe_load(text.replace("DEVICE", device)))


def _tensors(obj, path: str = ""):
    """``(path, tensor)`` of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _assert_cpu_checkpoint(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)  # no map_location: tensors come back where they were saved
    found = list(_tensors(ckpt))
    assert any(p.startswith(".model.") for p, _ in found) and any(p.startswith(".optim.") for p, _ in found)
    off = [(p, t.device) for p, t in found if t.device.type != "cpu"]
    assert not off, off[:5]


# --------------------------------------------------------------------------------- field and resolution
def test_device_defaults_to_cpu():
    r = parse_recipe(yaml.safe_load(VIT.replace("device: DEVICE\n", "")))
    assert r.device == "cpu"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_field_accepts_device_names(device):
    assert _recipe(device=device).device == device  # a GPU recipe loads anywhere; it fails only when trained


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu", r"device \(line 3\): 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ("cpu:0", r"device \(line 3\): 'cpu:0' is not a device"),
        ("cuda:x", r"'cuda:x' is not a device"),
        ("CUDA", r"'CUDA' is not a device"),
        ("3", r"device \(line 3\): expected a string"),
    ],
)
def test_bad_device_names_the_field_and_line(tmp_path, device, match):
    from dynsparse.recipes import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(VIT.replace("DEVICE", device))
    with pytest.raises(RecipeError, match=match):
        load_recipe(p)


def _cuda(monkeypatch, available: bool, count: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize(
    ("spec", "local_rank", "want"),
    [("cpu", None, "cpu"), ("auto", None, "cpu"), ("cpu", 1, "cpu"), ("auto", 1, "cpu")],
)
def test_resolve_without_cuda(monkeypatch, spec, local_rank, want):
    _cuda(monkeypatch, False)
    assert resolve_device(spec, local_rank=local_rank) == torch.device(want)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error_naming_the_field(monkeypatch, spec):
    from dynsparse.errors import ConfigError

    _cuda(monkeypatch, False)
    want = rf"^device: '{spec}' asks for CUDA, but torch.cuda.is_available\(\) is False"
    with pytest.raises(ConfigError, match=want):
        resolve_device(spec)


@pytest.mark.parametrize(
    ("spec", "local_rank", "want"),
    [
        ("auto", None, "cuda:0"),
        ("cuda", None, "cuda:0"),
        ("cuda:1", None, "cuda:1"),
        ("cuda", 1, "cuda:1"),  # torchrun: one GPU per rank
        ("auto", 1, "cuda:1"),
        ("cuda:0", 1, "cuda:1"),
        ("cpu", 1, "cpu"),
    ],
)
def test_resolve_with_two_gpus(monkeypatch, spec, local_rank, want):
    _cuda(monkeypatch, True, count=2)
    assert resolve_device(spec, local_rank=local_rank) == torch.device(want)


@pytest.mark.parametrize(("spec", "local_rank"), [("cuda:2", None), ("cuda", 2)])
def test_missing_gpu_index_is_a_config_error(monkeypatch, spec, local_rank):
    _cuda(monkeypatch, True, count=2)
    with pytest.raises(RecipeError, match=r"^device: .* needs GPU index 2, but this machine has 2 CUDA device"):
        resolve_device(spec, local_rank=local_rank)


def test_cli_device_flag_overrides_the_recipe(monkeypatch, tmp_path, capsys):
    """``--device cuda`` on a machine without CUDA: exit code 2 and the field in the message, before any training."""
    from dynsparse.cli import main

    _cuda(monkeypatch, False)
    p = tmp_path / "r.yaml"
    p.write_text(VIT.replace("DEVICE", "cpu"))
    assert main(["train", str(p), "--device", "cuda", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dynsparse train: error: device: 'cuda' asks for CUDA" in err
    assert not (tmp_path / "o" / "log.jsonl").exists()
    assert main(["train", str(p), "--device", "tpu", "--out", str(tmp_path / "o")]) == 2
    assert "device (line 3): 'tpu' is not a device" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ CPU runs
def test_explicit_cpu_run_saves_a_cpu_checkpoint(tmp_path):
    from dynsparse.recipes.run import run_recipe

    report = run_recipe(_recipe(device="cpu"), tmp_path, progress=False)
    assert report["converted_test_acc"] == pytest.approx(report["gated_test_acc"], abs=1e-6)
    _assert_cpu_checkpoint(tmp_path / "checkpoint.pt")
    assert json.loads(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["meta"]["recipe"])["device"] == "cpu"


# ----------------------------------------------------------------------------------------- CUDA runs
LENET = """\
name: dev-lenet
seed: 1
device: DEVICE
model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}
data: {dataset: digits, batch_size: 32, train_subset: 128}
stages:
  - {name: dense, epochs: 1}
  - name: s
    epochs: 2
    STAGE
evaluate: {latency: false}
"""
CNN = LENET.replace(
    "model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}",
    "model: {name: test_resnet, kwargs: {num_classes: 10, in_chans: 1}}",
).replace("dataset: digits,", "dataset: digits, image_size: 16,")
SMALL_VIT = LENET.replace(
    "model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}",
    "model: {name: vit_tiny_patch16_224, kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, "
    "embed_dim: 32, depth: 3, num_heads: 2}}",
)

_UNSTRUCTURED = "prune: {method: unstructured, ratio: 0.8, importance: SCORE, at: AT, calibration_batches: 2}"
_STRUCTURED = "prune: {method: structured, dimensions: {channels: 0.5}, importance: SCORE, calibration_batches: 2}"
VARIANTS = {
    "l0": (SMALL_VIT, "sparsify: {heads: {gate: hard_concrete}}\n    regularizers: [{name: l0, weight: 0.01}]"),
    "sigmoid-budget": (
        SMALL_VIT,
        "sparsify: {neurons: {gate: sigmoid}}\n    regularizers: [{name: budget, target: 0.6, kind: params}]\n"
        "    enforce_budget: true",
    ),
    "tokens-predictor": (
        SMALL_VIT.replace("evaluate:", "convert: {static: false}\nevaluate:"),
        "sparsify: {tokens: {gate: predictor, blocks: [1], keep: 0.5}}\n    regularizers: [{name: dynamic}]\n"
        "    distill: {weight: 1.0}",
    ),
    "tokens-threshold": (
        SMALL_VIT.replace("evaluate:", "convert: {static: false}\nevaluate:"),
        "sparsify: {tokens: {gate: threshold, blocks: [1]}}\n    regularizers: [{name: dynamic}]",
    ),
    "fbs": (
        CNN.replace("evaluate:", "convert: {static: false}\nevaluate:"),
        "sparsify: {channels: {gate: fbs, keep: 0.5}}\n    distill: {weight: 1.0}",
    ),
    "bn-slim": (
        CNN,
        "sparsify: {channels: {gate: fixed}}\n    regularizers: [{name: bn_l1, weight: 0.0001}]\n"
        "    prune: {method: bn_scale, ratio: 0.5}",
    ),
    "group-lasso-prox": (
        CNN,
        "sparsify: {channels: {gate: fixed}}\n    regularizers: [{name: group_lasso, weight: 0.001, prox: true}]\n"
        "    prune: {method: group_lasso, threshold: 0.001}",
    ),
    "group-lasso": (CNN, "sparsify: {channels: {gate: fixed}}\n    regularizers: [{name: group_lasso, weight: 0.001}]"),
    "sparse-vd": (LENET, "regularizers: [{name: sparse_vd, kl_end: 1}]\n    prune_vd: true"),
    "agp": (LENET, "prune: {method: unstructured, ratio: 0.8, schedule: agp, end_epoch: 1, frequency: 2}"),
    "linear-taylor": (
        LENET,
        "prune: {method: unstructured, ratio: 0.8, importance: taylor, schedule: linear, end_epoch: 1, frequency: 2, "
        "calibration_batches: 2}",
    ),
    **{
        f"unstructured-{s}-{at}": (LENET, _UNSTRUCTURED.replace("SCORE", s).replace("AT", at))
        for s in ("magnitude", "random", "gradient", "taylor", "obd", "snip", "grasp", "synflow", "wanda")
        for at in ("start", "end")
    },
    **{
        f"structured-{s}": (CNN, _STRUCTURED.replace("SCORE", s))
        for s in ("magnitude", "taylor", "activation", "apoz", "random")
    },
}


@CUDA
def test_cuda_run_then_cpu_report_and_cpu_checkpoint(tmp_path):
    """Gates, budget, distillation on the GPU; conversion, the saved model and latency on the CPU."""
    import dynsparse as ds
    from dynsparse.recipes.run import run_recipe

    text = VIT.replace("evaluate: {latency: false}", "evaluate: {batch_sizes: [1, 4], rounds: 2}")
    report = run_recipe(_recipe(text, "cuda"), tmp_path, progress=False)
    assert report["converted_test_acc"] == pytest.approx(report["gated_test_acc"], abs=0.02)
    assert report["flops"]["converted"] < report["flops"]["dense"] and len(report["latency"]) == 2
    _assert_cpu_checkpoint(tmp_path / "checkpoint.pt")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["cuda_rng"] is not None
    back = ds.load(tmp_path / "model.safetensors")
    assert all(p.device.type == "cpu" for p in back.parameters())


@CUDA
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_recipe_paths(tmp_path, monkeypatch, name):
    from dynsparse.recipes.run import run_recipe
    from dynsparse.recipes.train import Trainer

    text, stage = VARIANTS[name]
    recipe = _recipe(text.replace("STAGE", stage), "cuda")
    trained_on, original = [], Trainer.run

    def run(self):
        model = original(self)
        trained_on.append({t.device.type for t in [*model.parameters(), *model.buffers()]})
        return model

    monkeypatch.setattr(Trainer, "run", run)
    report = run_recipe(recipe, tmp_path, progress=False)
    assert trained_on == [{"cuda"}]
    _assert_cpu_checkpoint(tmp_path / "checkpoint.pt")
    assert report["converted_test_acc"] == pytest.approx(report["gated_test_acc"], abs=0.05)


def _crash_after(monkeypatch, n: int):
    from dynsparse.recipes.train import Trainer

    class Crash(Exception):
        pass

    original, saves = Trainer._save, []

    def crash(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == n:
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash)
    return Crash, lambda: monkeypatch.setattr(Trainer, "_save", original)


@CUDA
@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_resumes_on_the_other_device(tmp_path, monkeypatch, first, then):
    """Killed in the gate stage on one device, resumed on the other: the run finishes with the same structure."""
    import dynsparse as ds
    from dynsparse.recipes.train import Trainer

    text = VIT.replace("{name: finetune, epochs: 1", "{name: finetune, epochs: 2")
    crash, restore = _crash_after(monkeypatch, 3)
    with pytest.raises(crash):
        Trainer(_recipe(text, first), tmp_path, progress=False).run()
    restore()
    t = Trainer(_recipe(text, then), tmp_path, resume=True, progress=False)
    model = t.run()
    assert {p.device.type for p in model.parameters()} == {then}
    assert [r["stage"] for r in t.state.history] == ["dense", "gates", "finetune", "finetune"]
    assert all(type(g).__name__ == "FixedGate" for _, g in ds.named_gates(model))
    _assert_cpu_checkpoint(tmp_path / "checkpoint.pt")


@CUDA
def test_cuda_resume_is_exact(tmp_path, monkeypatch):
    """On the GPU too a killed run resumes to the same weights (CUDA RNG state in the checkpoint)."""
    from dynsparse.recipes.train import Trainer, state_digest

    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        straight = state_digest(Trainer(_recipe(device="cuda"), tmp_path / "a", progress=False).run())
        crash, restore = _crash_after(monkeypatch, 2)
        with pytest.raises(crash):
            Trainer(_recipe(device="cuda"), tmp_path / "b", progress=False).run()
        restore()
        resumed = Trainer(_recipe(device="cuda"), tmp_path / "b", resume=True, progress=False).run()
    finally:
        torch.use_deterministic_algorithms(False)
    assert state_digest(resumed) == straight


@CUDA
def test_cuda_sensitivity(tmp_path):
    from dynsparse.recipes.analyse import run_sensitivity

    text = LENET.replace("STAGE", "prune: {method: unstructured, ratio: 0.5}")
    rep = run_sensitivity(_recipe(text, "cuda"), tmp_path, ratios=[0.0, 0.5], eval_samples=64)
    assert len(rep["curves"]) == 3 and all(len(c) == 2 for c in rep["curves"].values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_torchrun_two_gpus_nccl_end_identical(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(VIT.replace("DEVICE", "cuda"))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), "-m", "dynsparse.cli", "train", str(recipe), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d0 = json.loads((out / "rank0.json").read_text())["digest"]
    d1 = json.loads((out / "rank1.json").read_text())["digest"]
    assert d0 == d1
    _assert_cpu_checkpoint(out / "checkpoint.pt")

"""Trainer: a killed run resumes to the same result; torchrun with two ranks ends with identical states."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = """\
name: tiny
seed: 3
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 640}
stages:
  - {name: dense, epochs: 2, optimizer: {name: adamw, lr: 0.003}}
  - name: gates
    epochs: 3
    sparsify: {heads: {gate: hard_concrete}, neurons: {gate: hard_concrete}, layers: {gate: hard_concrete}}
    regularizers: [{name: budget, target: 0.5, warmup_epochs: 2, lr: 0.05}]
    gate_optimizer: {name: adam, lr: 0.05}
    distill: {weight: 1.0}
    enforce_budget: true
  - {name: finetune, epochs: 2, fix_gates: true}
evaluate: {latency: false}
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(RECIPE)
    return p


def _train(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "dynsparse.cli",
        "train",
        str(recipe),
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(out: Path) -> list[dict]:
    log = out / "log.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_killed_run_resumes_to_the_same_result(tmp_path):
    recipe = _recipe(tmp_path)
    ref = _train(recipe, tmp_path / "a")
    out_a, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out_a
    # the same run, killed with SIGKILL in the middle of the gate stage, then resumed
    run = _train(recipe, tmp_path / "b")
    deadline = time.time() + 300
    while len(_records(tmp_path / "b")) < 3 and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert run.returncode == -signal.SIGKILL
    done = len(_records(tmp_path / "b"))
    assert 3 <= done < 7, f"kill landed after {done} epochs"
    resumed = _train(recipe, tmp_path / "b", "--resume")
    out_b, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out_b
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [r["epoch"] for r in b] == [r["epoch"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        assert ra["test_acc"] == rb["test_acc"] and ra["train_loss"] == rb["train_loss"], (ra, rb)
        assert ra.get("kept_flops") == rb.get("kept_flops")
    rep_a = json.loads((tmp_path / "a" / "report.json").read_text())
    rep_b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep_a["final_state_digest"] == rep_b["final_state_digest"]
    assert rep_a["converted_test_acc"] == rep_b["converted_test_acc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_end_identical(tmp_path):
    recipe = _recipe(tmp_path)
    recipe.write_text(RECIPE.replace("epochs: 3", "epochs: 1").replace("epochs: 2", "epochs: 1"))
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "dynsparse.cli",
        "train",
        str(recipe),
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d0 = json.loads((out / "rank0.json").read_text())["digest"]
    d1 = json.loads((out / "rank1.json").read_text())["digest"]
    assert d0 == d1
    assert len(_records(out)) == 3  # only rank 0 logs


@pytest.mark.parametrize("bad", ["stages[0].epochs=-1", "data.dataset=digitz"])
def test_cli_train_reports_bad_recipe(tmp_path, bad):
    recipe = _recipe(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "dynsparse.cli", "train", str(recipe), "--set", bad, "--out", str(tmp_path / "x")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "error:" in res.stderr


COMPOSED = """\
name: composed
seed: 1
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 320}
stages:
  - {name: dense, epochs: 1}
  - name: gates
    epochs: 1
    sparsify: {heads: {gate: hard_concrete}, neurons: {gate: hard_concrete}}
    regularizers: [{name: budget, target: 0.6}]
    enforce_budget: true
    prune: {method: magnitude, ratio: 0.5, exclude: ["head", "patch_embed.*"]}
  - {name: finetune, epochs: FT, fix_gates: true}
evaluate: {latency: false}
"""


def test_composed_stages_resume_exactly(tmp_path, monkeypatch):
    """Gates, then unstructured magnitude pruning of what remains; a run that crashes after the first fine-tuning
    epoch and is resumed ends exactly like an uninterrupted one (masked layers and fixed gates are rebuilt)."""
    import yaml

    import dynsparse as ds
    from dynsparse.prune import sparsity
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.train import Trainer, state_digest

    recipe = parse_recipe(yaml.safe_load(COMPOSED.replace("FT", "2")))
    straight = Trainer(recipe, tmp_path / "a", progress=False).run()

    class Crash(Exception):
        pass

    original = Trainer._save
    saves = []

    def crash_after_three(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == 3:
            raise Crash

    monkeypatch.setattr(Trainer, "_save", crash_after_three)
    with pytest.raises(Crash):
        Trainer(recipe, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(Trainer, "_save", original)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False).run()
    assert state_digest(resumed) == state_digest(straight)
    assert list(ds.named_gates(resumed)) and sparsity(resumed).overall > 0.3

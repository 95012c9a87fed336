"""``torchrun`` with two gloo ranks on the CPU: a recipe with a dense baseline and data-driven pruning finishes, writes
its report and model, and both ranks end with the same weights and masks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """\
name: ddp
seed: 3
baseline: true
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 320}
stages:
  - name: prune
    epochs: 1
    optimizer: {name: adamw, lr: 0.003}
    prune: {method: structured, dimensions: {neurons: 0.5}, importance: taylor, calibration_batches: 2}
evaluate: {latency: false}
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


#: the torchrun runs below use gloo over localhost TCP, set up for Linux / macOS
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="torchrun + gloo over localhost TCP: Linux / macOS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(tmp_path, text: str) -> Path:
    """``dynsparse train`` of the recipe ``text`` on two ranks (torchrun, gloo); returns the output directory."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), "-m", "dynsparse.cli", "train", str(recipe), "--out", str(out)]
    res = subprocess.run(
        [*cmd, "--threads", "1", "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@POSIX
def test_torchrun_baseline_and_pruning(tmp_path):
    out = _torchrun_train(tmp_path, RECIPE)
    # the baseline trained on both ranks (one DDP run of its own) and the sparse run's results were written
    assert {"report.json", "model.safetensors", "log.jsonl"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["dense_baseline_test_acc"] is not None
    for d in (out, out / "baseline"):
        digests = [json.loads((d / f"rank{r}.json").read_text())["digest"] for r in (0, 1)]
        assert digests[0] == digests[1], d  # pruning scored the same batches on both ranks: the same masks
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


BN_RECIPE = """\
name: ddp-bn
seed: 3
model:
  name: resnet10t
  kwargs: {in_chans: 1, num_classes: 10}
data: {dataset: digits, batch_size: 16, train_subset: 128}
stages:
  - {name: train, epochs: 1, optimizer: {name: sgd, lr: 0.05}}
evaluate: {latency: false}
convert: {enabled: false}
"""


@POSIX
def test_torchrun_batchnorm_statistics_end_identical_on_every_rank(tmp_path):
    """Each rank updates its BatchNorm running statistics from its own shard (DDP only broadcasts rank 0's at the
    start of a forward): the trainer gives every rank rank 0's buffers after each epoch."""
    out = _torchrun_train(tmp_path, BN_RECIPE)
    digests = [json.loads((out / f"rank{r}.json").read_text())["digest"] for r in (0, 1)]
    assert digests[0] == digests[1]

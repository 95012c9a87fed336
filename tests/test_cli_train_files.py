"""``dynsparse train`` writes gated.safetensors and records the input in its model files; eval and convert use them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.convert.io import read_info

RECIPE = """\
name: files
seed: 0
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 16, patch_size: 4, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, image_size: 16, batch_size: 64, train_subset: 128}
stages:
STAGES
evaluate: {latency: false}
"""
GATED = """\
  - {name: dense, epochs: 1}
  - name: gates
    epochs: 1
    sparsify: {heads: {gate: hard_concrete}, neurons: {gate: hard_concrete}, layers: {gate: hard_concrete}}
    regularizers: [{name: budget, target: 0.5, kind: flops, lr: 0.05}]
    gate_optimizer: {name: adam, lr: 0.05}
    enforce_budget: true"""
DENSE = "  - {name: dense, epochs: 1}"
DATA = {
    "dataset": "digits",
    "image_size": 16,
    "channels": None,
    "input_shape": [1, 16, 16],
    "mean": [0.3056],
    "std": [0.3763],
}


def _train(path, stages):
    recipe = path / "r.yaml"
    recipe.write_text(RECIPE.replace("STAGES", stages))
    assert main(["train", str(recipe), "--out", str(path / "run"), "--threads", "1", "--no-progress"]) == 0
    return path / "run"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gated"), GATED)


def test_the_run_writes_both_model_files_with_their_input(run):
    for name, kind in (("gated.safetensors", "gated"), ("model.safetensors", "converted")):
        info = read_info(run / name)
        assert info["kind"] == kind and info["data"] == DATA
        assert info["arch"]["kwargs"]["img_size"] == 16
    files = json.loads((run / "report.json").read_text())["files"]
    assert files == {
        "gated": "gated.safetensors",
        "model": "model.safetensors",
        "report": "report.json",
        "plot": "report.png",
    }


def test_converting_the_gated_file_gives_the_runs_model(run, tmp_path, capsys):
    assert main(["convert", str(run / "gated.safetensors"), "--out", str(tmp_path)]) == 0
    assert "max-abs difference to the gated model on a random image: 0" in capsys.readouterr().out
    mine, theirs = ds.load(tmp_path / "model.safetensors"), ds.load(run / "model.safetensors")
    assert read_info(tmp_path / "model.safetensors")["data"] == DATA  # carried over from the gated file
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (mine(x) - theirs(x)).abs().max().item()
    assert diff == 0, f"max-abs diff {diff}"
    assert mine.state_dict().keys() == theirs.state_dict().keys()


def test_eval_needs_no_data_flags(run, capsys):
    model = run / "model.safetensors"
    assert main(["eval", str(model)]) == 0  # digits at 16x16, as stored; the native size is 8x8
    out = capsys.readouterr()
    assert out.out.endswith("% on 360 digits images\n") and out.err == ""
    assert main(["eval", str(model), "--dataset", "digits", "--image-size", "16", "--channels", "1"]) == 0
    assert capsys.readouterr().err == ""  # flags that agree with the file: no warning


def test_eval_flags_that_contradict_the_file_warn_and_win(run, capsys):
    model = run / "model.safetensors"
    assert main(["eval", str(model), "--image-size", "8"]) == 2  # the flag wins: 8x8 images do not fit the ViT
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"dynsparse eval: warning: {model}: the model was trained on 16x16 images; evaluating at --image-size 8 "
        "(stored in the file)"
    )
    assert err[1].startswith(f"dynsparse eval: error: {model}: the digits test images (1x8x8) do not run")
    assert main(["eval", str(model), "--dataset", "mnist", "--root", str(run / "nothing")]) != 0
    err = capsys.readouterr().err
    assert f"warning: {model}: the model was trained on digits; evaluating on --dataset mnist" in err


def test_eval_of_a_file_without_data_needs_dataset(tmp_path, capsys):
    from cli_models import write_files

    _, converted = write_files(tmp_path, data=None)
    assert main(["eval", str(converted)]) == 2
    assert (
        capsys.readouterr().err
        == f"dynsparse eval: error: {converted}: no data set stored in the file; pass --dataset\n"
    )


def test_a_run_without_gates_writes_no_gated_file(tmp_path, caplog):
    stale = tmp_path / "run" / "gated.safetensors"  # left by an earlier, gated run in the same directory
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's file")
    with caplog.at_level(logging.INFO, logger="dynsparse.recipes.gated_file"):
        run = _train(tmp_path, DENSE)
    assert run == stale.parent
    assert not (run / "gated.safetensors").exists() and (run / "model.safetensors").exists()
    assert "no gates (the model was not sparsified): no gated.safetensors written" in caplog.text
    assert "gated" not in json.loads((run / "report.json").read_text())["files"]


def test_a_refused_gated_file_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    import importlib

    io = importlib.import_module("dynsparse.convert.io")  # ``dynsparse.convert`` is also the function

    def refuse(*args, **kwargs):
        raise ds.ConfigError("save_gated: the sparsify spec must be JSON data")

    monkeypatch.setattr(io, "save_gated", refuse)
    with caplog.at_level(logging.WARNING, logger="dynsparse.recipes.gated_file"):
        run = _train(tmp_path, GATED)
    assert "gated.safetensors not written: ConfigError: save_gated: the sparsify spec must be JSON data" in caplog.text
    assert not (run / "gated.safetensors").exists() and (run / "model.safetensors").exists()


def test_any_error_of_the_gated_file_leaves_the_finished_run_intact(tmp_path, monkeypatch, caplog):
    """The gated file is an extra of a finished run: an unexpected error (not a DynsparseError) is logged."""
    import importlib

    io = importlib.import_module("dynsparse.convert.io")

    def broken(*args, **kwargs):
        raise RuntimeError("a layer kind load_gated cannot replay")

    monkeypatch.setattr(io, "load_gated", broken)
    with caplog.at_level(logging.WARNING, logger="dynsparse.recipes.gated_file"):
        run = _train(tmp_path, GATED)
    assert "not written: RuntimeError: a layer kind load_gated cannot replay" in caplog.text
    assert not (run / "gated.safetensors").exists() and (run / "report.json").exists()

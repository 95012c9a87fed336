"""Second review of the command line: ``~`` in recipe and run paths, flags checked before any training or pruning,
and output directories that hold only what the last command wrote."""

from __future__ import annotations

import os

import pytest
from cli_models import write_files

from dynsparse.cli import main

RECIPE = """\
name: sens
seed: 0
model: {name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}
data: {dataset: digits, batch_size: 32, train_subset: 64}
stages:
  - {name: dense, epochs: 1}
evaluate: {latency: false}
"""


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def test_prune_with_an_input_the_model_does_not_take_names_the_flag(files, tmp_path, capsys):
    _, converted = files
    out = tmp_path / "out"
    assert main(["prune", str(converted), "--heads", "0.5", "--input", "3,8,8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse prune: error: {converted}: an input of shape 3x8x8 (--input) does not run")
    assert "please report" not in err and err.count("\n") == 1
    assert not out.exists()  # refused before anything was pruned or written


def test_prune_leaves_no_stale_outputs_of_an_earlier_prune_in_its_directory(files, tmp_path, capsys):
    gated, converted = files
    out = tmp_path / "out"
    assert main(["prune", str(gated), "--heads", "0.5", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["gated.safetensors", "model.safetensors", "plan.json"]
    assert main(["prune", str(converted), "--unstructured", "0.5", "--out", str(out)]) == 0
    # the gated checkpoint and plan of the first prune did not describe the new model.safetensors
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert "wrote model.safetensors\n" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "sensitivity"])
def test_recipe_and_run_paths_read_a_leading_tilde_as_home(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.yaml").write_text(RECIPE)
    extra = ["--set", "seedx=1"] if command == "train" else ["--from-run=~/missing"]
    assert main([command, "~/r.yaml", *extra]) == 2
    err = capsys.readouterr().err
    if command == "train":  # the recipe was read: its field is the error
        assert "unknown field 'seedx'" in err
    else:
        assert err.startswith(f"dynsparse sensitivity: error: --from-run {tmp_path / 'missing'}: no checkpoint.pt")


@pytest.mark.parametrize("value", ["neuron", "channels,", "tokens"])
def test_sensitivity_dimensions_are_checked_before_training(value, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["sensitivity", str(recipe), "--group", "units", "--dimensions", value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse sensitivity: error: --dimensions {value}: ") and err.count("\n") == 1
    assert not out.exists()  # nothing trained


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_convert_atol_must_be_a_finite_nonnegative_number(value, files, tmp_path, capsys):
    gated, _ = files
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(gated), "--out", str(tmp_path / "o"), "--atol", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --atol:" in err and "Traceback" not in err


def test_eval_on_an_image_folder_without_root_names_the_flag(files, capsys):
    _, converted = files
    assert main(["eval", str(converted), "--dataset", "image-folder"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"dynsparse eval: error: {converted}: data set image-folder: pass --root DIR")


def test_every_sensitivity_option_has_a_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["sensitivity", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--ratios RATIOS [RATIOS ...] fractions pruned" in out

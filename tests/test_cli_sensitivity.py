"""``dynsparse sensitivity RECIPE``: trains the dense prefix, prunes one layer at a time, writes table/JSON/PNG."""

from __future__ import annotations

import json

import pytest

from dynsparse.cli import main

RECIPE = """\
name: sens
seed: 0
model: MODEL
data: {dataset: digits, batch_size: 32, train_subset: 256, image_size: IMG}
stages:
  - {name: dense, epochs: 1, optimizer: {lr: 0.003}}
  - {name: prune, epochs: 1, prune: {method: unstructured, ratio: 0.5}}
evaluate: {latency: false}
"""
MLP = "{name: lenet_300_100, library: dynsparse, kwargs: {img_size: 8}}"
VIT = "{name: test_vit, kwargs: {img_size: 16, num_classes: 10, in_chans: 1}}"


def _write(tmp_path, model=MLP, img=8, text=RECIPE):
    p = tmp_path / "r.yaml"
    p.write_text(text.replace("MODEL", model).replace("IMG", str(img)))
    return p


def test_element_sensitivity_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "sensitivity",
            str(_write(tmp_path)),
            "--out",
            str(out),
            "--ratios",
            "0",
            "0.5",
            "0.99",
            "--max-drop",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| fc1.weight |" in printed and "largest ratio per layer" in printed
    rep = json.loads((out / "sensitivity.json").read_text())
    assert set(rep["curves"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for curve in rep["curves"].values():  # ratio 0 is the unpruned model: the same accuracy for every layer
        assert curve[0] == rep["baseline_acc"]
    assert min(c[-1] for c in rep["curves"].values()) < rep["baseline_acc"]  # 99 % of one layer hurts somewhere
    assert all(r in (0.0, 0.5, 0.99) for r in rep["ratios_for"].values())
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sensitivity.md").read_text().count("\n") == 5  # header, separator, three layers
    # a second call resumes the finished dense training instead of training again
    assert main(["sensitivity", str(_write(tmp_path)), "--out", str(out), "--ratios", "0", "0.5", "--no-progress"]) == 0


def test_unit_sensitivity_gates_a_dense_model(tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "sensitivity",
            str(_write(tmp_path, VIT, 16)),
            "--out",
            str(out),
            "--group",
            "units",
            "--dimensions",
            "heads,neurons",
            "--ratios",
            "0",
            "0.5",
            "--eval-samples",
            "64",
            "--no-progress",
        ]
    )
    assert rc == 0
    rep = json.loads((out / "sensitivity.json").read_text())
    assert rep["eval_samples"] == 64 and rep["group"] == "units"
    assert any(k.endswith("attn.norm.gate") or "attn" in k for k in rep["curves"])
    assert any("mlp" in k for k in rep["curves"])


def test_errors_name_the_problem(tmp_path, capsys):
    text = RECIPE.replace("  - {name: dense, epochs: 1, optimizer: {lr: 0.003}}\n", "")
    assert main(["sensitivity", str(_write(tmp_path, text=text)), "--out", str(tmp_path / "o")]) == 2
    assert "first stage already sparsifies" in capsys.readouterr().err
    assert main(["sensitivity", str(_write(tmp_path)), "--from-run", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sensitivity", str(_write(tmp_path)), "--group", "rows"])


def test_bad_options_fail_before_training(tmp_path, capsys):
    out = tmp_path / "o"
    for extra, message in [
        (["--eval-samples", "0"], "--eval-samples: must be at least 1"),
        (["--ratios", "0", "1.5"], "--ratios: each ratio must be in [0, 1)"),
        (["--ratios", "0.5", "0.9", "--max-drop", "1"], "--max-drop needs ratio 0"),
        (["--ratios", "0", "0.5", "--max-drop", "-5"], "--max-drop: accuracy points lost, at least 0, got -5.0"),
    ]:
        assert main(["sensitivity", str(_write(tmp_path)), "--out", str(out), "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # refused before the dense model was trained


def test_max_drop_finds_ratio_zero_anywhere_in_the_list(tmp_path):
    out = tmp_path / "out"
    argv = ["sensitivity", str(_write(tmp_path)), "--out", str(out), "--ratios", "0.5", "0", "--max-drop", "100"]
    assert main([*argv, "--eval-samples", "64", "--no-progress"]) == 0
    rep = json.loads((out / "sensitivity.json").read_text())
    assert rep["baseline_acc"] == rep["curves"]["fc1.weight"][1]  # the accuracy at ratio 0, the second column
    assert set(rep["ratios_for"].values()) <= {0.0, 0.5}


def test_recipe_task_field(tmp_path, capsys):
    explicit = RECIPE.replace("name: sens\n", "name: sens\ntask: image-classification\n")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--ratios", "0", "0.5", "--eval-samples", "32", "--no-progress"]
    assert main(["sensitivity", str(_write(tmp_path, text=explicit)), *argv]) == 0  # as `dynsparse train` reads it
    assert (out / "sensitivity.json").is_file()
    text = tmp_path / "text.yaml"
    text.write_text("task: sentence-embedding\nname: minilm\n")
    assert main(["sensitivity", str(text), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "task: sentence-embedding: sensitivity analyses image-classification recipes only" in err


def test_an_unknown_layer_is_refused_before_training(tmp_path, capsys):
    """--layers names are checked on the recipe's model before the dense prefix trains, with a close match."""
    out = tmp_path / "out"
    argv = ["sensitivity", str(_write(tmp_path)), "--out", str(out), "--layers", "fc1.wieght", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--layers: sensitivity: unknown layer 'fc1.wieght' for group 'element'. Did you mean 'fc1.weight'" in err
    assert not (out / "dense").exists()  # nothing trained

"""The file commands as a user runs them: ``python -m dynsparse``, outputs that would replace the input, model
files in another dtype than float32, ``~`` in paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_models import ARCH, DATA, gated_model, write_files

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.convert.io import read_info

FAST = ["--rounds", "1", "--warmup", "0"]


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def test_python_dash_m_dynsparse_runs_the_command_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ds.__file__).parents[1]), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "dynsparse", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: dynsparse ")


@pytest.mark.parametrize("command", ["analyse", "bench"])
def test_json_naming_the_model_file_is_refused_and_the_file_kept(files, command, capsys):
    _, converted = files
    before = converted.read_bytes()
    extra = FAST if command == "bench" else []
    assert main([command, str(converted), *extra, "--json", str(converted)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse {command}: error: --json {converted}: is the input file {converted}")
    assert err.count("\n") == 1 and converted.read_bytes() == before


@pytest.mark.parametrize("which", [0, 1])
def test_prune_into_the_input_files_directory_is_refused_and_the_file_kept(files, which, capsys):
    path = files[which]  # gated.safetensors or model.safetensors, pruned into the directory holding it
    before = path.read_bytes()
    assert main(["prune", str(path), "--out", str(path.parent), "--heads", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse prune: error: --out {path.parent}: would replace the input file {path}")
    assert path.read_bytes() == before


def test_convert_into_the_checkpoints_own_path_is_refused(tmp_path, capsys):
    gated = ds.save_gated(gated_model(), tmp_path / "model.safetensors", arch=ARCH, data=DATA)
    before = gated.read_bytes()
    assert main(["convert", str(gated), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"dynsparse convert: error: --out {tmp_path}: would replace the input")
    assert gated.read_bytes() == before


def _bf16_file(tmp_path: Path) -> Path:
    model = ds.convert(gated_model()).to(torch.bfloat16)
    return ds.save(model, tmp_path / "bf16.safetensors", arch=ARCH, data=DATA)


def test_bench_times_models_of_different_dtypes_side_by_side(files, tmp_path, capsys):
    bf16 = _bf16_file(tmp_path)
    out = tmp_path / "b.json"
    assert main(["bench", str(bf16), str(files[1]), "--dense", *FAST, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["batches"][0]["rows"]
    assert [r["name"] for r in rows] == ["dense", str(bf16), str(files[1])]


def test_eval_of_a_bfloat16_model_file(tmp_path, capsys):
    bf16 = _bf16_file(tmp_path)
    assert main(["eval", str(bf16)]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_a_leading_tilde_is_the_home_directory(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "~/gated.safetensors", "--out=~/pruned", "--heads", "0.5"]) == 0
    assert main(["convert", "~/gated.safetensors", "--out=~/converted"]) == 0
    assert main(["analyse", "~/converted/model.safetensors", "--json=~/a.json"]) == 0
    assert main(["bench", "~/pruned/model.safetensors", *FAST, "--json=~/b.json"]) == 0
    assert main(["eval", "~/pruned/model.safetensors"]) == 0
    assert read_info(tmp_path / "pruned" / "model.safetensors")["kind"] == "converted"
    assert (tmp_path / "converted" / "plan.json").is_file()
    assert (tmp_path / "a.json").is_file() and (tmp_path / "b.json").is_file()
    assert not (tmp_path / "~").exists()


def test_bench_of_a_text_encoder_says_so_instead_of_asking_for_an_image_shape(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face extra")
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    data = {"distill": ["english-sentences"], "max_length": 64, "tokenizer": "all-minilm-l6-v2"}
    path = ds.save(ds.convert(model), tmp_path / "m.safetensors", data=data)
    assert main(["bench", str(path), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse bench: error: {path}: a text encoder (tokenizer all-minilm-l6-v2)")
    assert "pass --input" not in err and "report.json" in err


def test_units_of_a_converted_per_input_model_are_pruned_and_its_run_time_gates_kept(tmp_path):
    from dynsparse.convert.io import build_host
    from dynsparse.layers.tokens import TokenGatedBlock

    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    path = ds.save(ds.convert(model, static=False), tmp_path / "tokens.safetensors", arch=ARCH, data=DATA)
    assert main(["prune", str(path), "--out", str(tmp_path / "p"), "--neurons", "0.5"]) == 0
    small = ds.load(tmp_path / "p" / "model.safetensors")
    assert isinstance(small.blocks[1], TokenGatedBlock) and small.slice_plan.dynamic["tokens"]["keep"] == [0.5]
    assert small.blocks[0].mlp.fc1.out_features < model.blocks[0].mlp.fc1.out_features


def test_prune_help_names_the_output_directory_as_its_description_does(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--out DIR" in out and "write the result to DIR" in out and "plan.json" in out


def test_the_dtype_cast_keeps_the_models_training_flag():
    from dynsparse.bench.latency import compare_latency
    from dynsparse.commands.modelfile import with_input_dtype

    model = torch.nn.Linear(3, 2).to(torch.bfloat16).eval()
    compare_latency({"m": with_input_dtype(model, torch.float32)}, torch.randn(2, 3), rounds=1, warmup=0)
    assert not model.training


def test_set_budget_names_an_unknown_key_whatever_the_key_types():
    from dynsparse.convert.io import build_host

    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    with pytest.raises(ds.ConfigError, match="no input-dependent gate named"):
        ds.set_budget_(model, {3: 0.5, "blocks.0.tokens.gate": 0.5})
    assert ds.get_budget(model) == {"blocks.1.tokens.gate": 0.5}


def test_compare_latency_takes_the_integer_types_knob_curve_takes():
    import numpy as np  # dynsparse imports it itself (gates): never absent where the package runs

    from dynsparse.bench.latency import compare_latency

    res = compare_latency({"m": torch.nn.Linear(3, 2)}, torch.randn(2, 3), rounds=np.int64(2), warmup=np.int64(0))
    assert res.rounds == 2 and type(res.rounds) is int

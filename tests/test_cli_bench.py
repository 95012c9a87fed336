"""``dynsparse bench MODEL ...``: the tables and JSON of a side-by-side timing, and its errors (no timings asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from cli_models import ARCH, DATA, write_files

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.convert.io import build_host
from dynsparse.flops import count_flops, mean_flops

FAST = ["--rounds", "1", "--warmup", "0"]


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def test_bench_against_dense_reports_latency_flops_and_params(files, tmp_path, capsys):
    gated, converted = files
    out = tmp_path / "bench.json"
    argv = ["bench", str(converted), str(gated), "--dense", "--batch", "1", "2", *FAST, "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("1 thread (--threads), median of 1 interleaved rounds after 0 warm-up rounds; ")
    assert f"input 1x8x8 (stored in {converted}), random normal" in printed
    assert "reference: dense (vit_tiny_patch16_224, random weights, no plan)" in printed
    assert printed.count("speed-up  FLOPs/input   ideal  achieved/ideal") == 2
    r = json.loads(out.read_text())
    assert r["reference"] == "dense" and r["threads"] == 1 and r["input_shape"] == [1, 8, 8]
    assert [m["name"] for m in r["models"]] == ["dense", str(converted), str(gated)]
    assert [m["kind"] for m in r["models"]] == ["dense", "converted", "gated"]
    assert [b["batch"] for b in r["batches"]] == [1, 2]
    for b in r["batches"]:
        assert [row["name"] for row in b["rows"]] == ["dense", str(converted), str(gated)]
        assert all(row["median_ms"] > 0 for row in b["rows"]) and b["rows"][0]["speedup"] == 1.0
    x = torch.zeros(1, 1, 8, 8)
    dense_flops, conv_flops = count_flops(build_host(ARCH), x), count_flops(ds.load(converted), x)
    dense, conv, gate = r["models"]
    assert (dense["flops"], conv["flops"]) == (dense_flops, conv_flops)
    assert conv["ideal_speedup"] == pytest.approx(dense_flops / conv_flops) and conv["ideal_speedup"] > 1.5
    assert gate["ideal_speedup"] == pytest.approx(1.0)  # the gated model runs every unit (masked)
    assert conv["params"] == sum(p.numel() for p in ds.load(converted).parameters())
    assert gate["params"] == dense["params"]  # the gates' own parameters are not counted
    row = r["batches"][0]["rows"][1]
    assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / conv["ideal_speedup"])


def test_without_dense_the_first_file_is_the_reference(files, capsys):
    gated, converted = files
    assert main(["bench", str(gated), str(converted), "--threads", "2", *FAST]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("2 threads (--threads)") and f"reference: {gated}\n" in printed


def test_the_same_file_twice_is_two_rows(files, capsys):
    _, converted = files
    assert main(["bench", str(converted), str(converted), "--input", "1,8,8", *FAST]) == 0
    assert f"{converted} #2 " in capsys.readouterr().out


def test_per_input_models_average_flops_over_distinct_inputs(tmp_path, capsys):
    from dynsparse.commands.modelfile import random_inputs

    torch.manual_seed(0)
    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    path = ds.save(ds.convert(model, static=False), tmp_path / "tokens.safetensors", arch=ARCH, data=DATA)
    out = tmp_path / "b.json"
    assert main(["bench", str(path), "--flops-inputs", "3", *FAST, "--json", str(out)]) == 0
    assert "FLOPs are the mean over distinct random inputs (*)" in capsys.readouterr().out
    (m,) = json.loads(out.read_text())["models"]
    assert m["dynamic"] and m["flops_inputs"] == 3
    assert m["flops"] == pytest.approx(mean_flops(ds.load(path), random_inputs([1, 8, 8], 3, seed=1)))


def test_no_input_shape_anywhere_is_one_line_naming_the_file(tmp_path, capsys):
    _, converted = write_files(tmp_path, data=None)
    assert main(["bench", str(converted), *FAST]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dynsparse bench: error: {converted}: no input shape stored in the file (saved without data=..., e.g. by an "
        "older dynsparse); pass --input C,H,W\n"
    )
    assert main(["bench", str(converted), "--input", "1x8x8", *FAST]) == 0


def test_bad_inputs_are_one_line(files, tmp_path, capsys):
    _, converted = files
    other = tmp_path / "other"
    other.mkdir()
    _, small = write_files(other, data={**DATA, "input_shape": [1, 4, 4]})
    assert main(["bench", str(converted), str(small), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse bench: error: {small}: stores input shape 1x4x4, {converted} stores 1x8x8")
    assert main(["bench", str(converted), "--input", "3,8,8", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse bench: error: {converted}: an input of shape 3x8x8 (--input) does not run")
    assert err.count("\n") == 1
    assert main(["bench", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err == f"dynsparse bench: error: {tmp_path / 'missing.safetensors'}: no such file\n"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--input", "1,8"), ("--input", "0,8,8"), ("--batch", "0"), ("--rounds", "0"), ("--warmup", "-1")],
)
def test_bad_flag_values_are_refused_by_argparse(files, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(files[1]), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err


def test_a_run_time_gates_parameters_are_counted(tmp_path):
    """A token predictor runs with the model at inference: its parameters count (they were left out as "gates")."""
    torch.manual_seed(0)
    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "predictor", "blocks": [1], "keep": 0.5}})
    gated = ds.save_gated(model, tmp_path / "gated.safetensors", arch=ARCH, data=DATA)
    conv = ds.save(ds.convert(model, static=False), tmp_path / "tokens.safetensors", arch=ARCH, data=DATA)
    out = tmp_path / "b.json"
    assert main(["bench", str(conv), str(gated), "--dense", "--flops-inputs", "2", *FAST, "--json", str(out)]) == 0
    dense, m, g = json.loads(out.read_text())["models"]
    n = sum(p.numel() for p in ds.load(conv).parameters())
    assert m["params"] == g["params"] == n and n > dense["params"]


def test_json_naming_a_directory_is_refused_before_the_timing(files, tmp_path, capsys):
    _, converted = files
    assert main(["bench", str(converted), *FAST, "--json", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"dynsparse bench: error: --json {tmp_path}: is a directory")


def test_a_per_input_models_ideal_is_counted_on_the_inputs_timed(tmp_path):
    """achieved/ideal at each batch size compares the time of the timed inputs with *their* FLOPs, not with the
    FLOPs of the other inputs the FLOPs/input column averages over."""
    from dynsparse.commands.modelfile import random_inputs

    torch.manual_seed(0)
    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    path = ds.save(ds.convert(model, static=False), tmp_path / "tokens.safetensors", arch=ARCH, data=DATA)
    out = tmp_path / "b.json"
    assert main(["bench", str(path), "--dense", "--batch", "1", "3", *FAST, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    dense_flops = count_flops(build_host(ARCH), torch.zeros(1, 1, 8, 8))
    for b in r["batches"]:
        timed = random_inputs([1, 8, 8], b["batch"], seed=2)
        dense_row, row = b["rows"]
        assert dense_row["ideal_speedup"] == pytest.approx(1.0)
        assert row["ideal_speedup"] == pytest.approx(dense_flops / mean_flops(ds.load(path), timed))
        assert row["achieved_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])

"""``dynsparse convert``: plan.json is written atomically (a failed write leaves the last good file)."""

from __future__ import annotations

import json

import pytest
import torch

import dynsparse as ds


def _gated_checkpoint(tmp_path):
    from dynsparse.convert.io import build_host

    model = build_host({"library": "timm", "name": "test_resnet", "kwargs": {}}, source="test").eval()
    ds.sparsify_(model, {"channels": {"gate": "fixed"}})
    masks = {n: torch.arange(g.num_units) >= g.num_units // 2 for n, g in ds.named_gates(model)}
    ds.fix_gates_(model, masks)  # half of every gate's channels closed
    return ds.save_gated(model, tmp_path / "ck.safetensors")


def test_convert_writes_plan_json_atomically(tmp_path, monkeypatch):
    import dynsparse.atomic
    from dynsparse.cli import main

    ck = _gated_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text('{"old": true}\n')
    real = dynsparse.atomic.atomic_write

    def failing(path, write):  # plan.json: the write fails after writing its temporary file
        def write_then_fail(tmp):
            write(tmp)
            raise OSError("disk full")

        return real(path, write_then_fail if str(path).endswith("plan.json") else write)

    monkeypatch.setattr(dynsparse.atomic, "atomic_write", failing)
    with pytest.raises(OSError, match="disk full"):
        main(["convert", str(ck), "--out", str(out)])
    assert json.loads((out / "plan.json").read_text()) == {"old": True}  # the last good file, not a torn one
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "plan.json"]  # no temp file left
    monkeypatch.setattr(dynsparse.atomic, "atomic_write", real)
    assert main(["convert", str(ck), "--out", str(out)]) == 0
    assert "old" not in json.loads((out / "plan.json").read_text())


def test_an_out_path_that_is_a_file_is_one_error_line(tmp_path, capsys):
    from dynsparse.cli import main

    ck = _gated_checkpoint(tmp_path)
    assert main(["convert", str(ck), "--out", str(ck)]) == 1  # --out names the checkpoint file itself
    err = capsys.readouterr().err
    assert err == f"dynsparse convert: error: {ck}: File exists\n"


def test_converting_a_converted_model_says_it_is_converted_already(tmp_path, capsys):
    from dynsparse.cli import main

    ck = _gated_checkpoint(tmp_path)
    assert main(["convert", str(ck), "--out", str(tmp_path / "c")]) == 0
    converted = tmp_path / "c" / "model.safetensors"  # what `dynsparse train` writes too
    assert main(["convert", str(converted), "--out", str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err
    assert f"{converted}: holds a 'converted' model, not a gated checkpoint; it is converted already" in err


def test_convert_keeps_run_time_gates_and_counts_their_parameters(tmp_path, capsys):
    from cli_models import ARCH, DATA

    from dynsparse.cli import main
    from dynsparse.convert.io import build_host

    torch.manual_seed(0)
    model = ds.sparsify_(build_host(ARCH).eval(), {"tokens": {"gate": "predictor", "blocks": [1], "keep": 0.5}})
    path = ds.save_gated(model, tmp_path / "gated.safetensors", arch=ARCH, data=DATA)
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 0
    n = sum(p.numel() for p in ds.load(tmp_path / "out" / "model.safetensors").parameters())
    out = capsys.readouterr().out
    assert f"parameters: {n:,} -> {n:,} (100.0%)\n" in out  # the predictor counted on both sides
    assert "input-dependent gates kept as run-time modules" in out
    assert main(["eval", str(tmp_path / "out" / "model.safetensors")]) == 0  # the per-input model runs


def test_an_unwritable_output_names_the_users_path_not_a_temporary_file(tmp_path, capsys):
    from dynsparse.cli import main

    ck = _gated_checkpoint(tmp_path)
    (tmp_path / "out" / "model.safetensors").mkdir(parents=True)  # the file's name is taken by a directory
    assert main(["convert", str(ck), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse convert: error: {tmp_path / 'out' / 'model.safetensors'}: "), err


def test_a_bfloat16_checkpoint_converts_with_the_default_tolerance(tmp_path, capsys):
    """The built-in output check's default tolerance follows the model's precision: a bfloat16 model's gated and
    converted outputs differ by bfloat16 rounding, which a float32 tolerance of 1e-4 refused."""
    from dynsparse.cli import main
    from dynsparse.convert.io import build_host

    torch.manual_seed(0)
    model = build_host({"library": "timm", "name": "test_vit", "kwargs": {}}, source="test").eval()
    ds.sparsify_(model, {"neurons": {"gate": "hard_concrete"}, "heads": {"gate": "hard_concrete"}})
    with torch.no_grad():  # trained-looking gates: some units closed, the open ones at fractional values
        for _, g in ds.named_gates(model):
            g.log_alpha.uniform_(-3, 3)
    ds.fix_gates_(model)  # the values are folded into the weights by the conversion: bfloat16 rounding
    ck = ds.save_gated(model.to(torch.bfloat16), tmp_path / "ck.safetensors")
    assert main(["convert", str(ck), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err

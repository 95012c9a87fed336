"""``dynsparse prune MODEL --out DIR``: one-shot data-free pruning of weights or whole units, and its errors."""

from __future__ import annotations

import pytest
import torch
from cli_models import DATA, write_files

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.convert.io import read_info


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def test_unstructured_zeroes_the_smallest_weights_of_a_converted_file(files, tmp_path, capsys):
    _, converted = files
    out = tmp_path / "out"
    assert main(["prune", str(converted), "--unstructured", "0.75", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"pruned {converted} -> {out}: wrote model.safetensors\n")
    before, after = ds.load(converted), ds.load(out / "model.safetensors")
    assert read_info(out / "model.safetensors")["data"] == DATA
    weights = [n for n, m in after.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    kept = sum(int((after.get_submodule(n).weight != 0).sum()) for n in weights)
    total = sum(after.get_submodule(n).weight.numel() for n in weights)
    assert kept == total - round(0.75 * total)  # exactly, over all Linear / Conv2d weights (global scope)
    for n in weights:  # the kept weights are unchanged
        w0, w1 = before.get_submodule(n).weight, after.get_submodule(n).weight
        assert torch.equal(w1[w1 != 0], w0[w1 != 0])


def test_whole_units_of_a_gated_file(files, tmp_path, capsys):
    gated, _ = files
    out = tmp_path / "out"
    rc = main(["prune", str(gated), "--neurons", "0.5", "--heads", "0.5", "--importance", "l2", "--out", str(out)])
    assert rc == 0
    assert "wrote model.safetensors, gated.safetensors, plan.json" in capsys.readouterr().out
    small = ds.load(out / "model.safetensors")
    assert small.blocks[1].mlp.fc1.out_features == 64  # half of 128; the closed quarter stays closed
    assert small.blocks[1].attn.num_heads == 1 and not hasattr(small.blocks[0].mlp, "fc1")
    back, info = ds.load_gated(out / "gated.safetensors")
    assert info["data"] == DATA
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (back.eval()(x) - small(x)).abs().max().item()
    assert diff < 1e-5, f"max-abs diff {diff}"


def test_channels_of_a_dense_converted_file(tmp_path):
    from dynsparse.convert.io import build_host

    arch = {"name": "test_resnet", "kwargs": {"num_classes": 4}}
    torch.manual_seed(0)
    path = ds.save(
        ds.convert(build_host(arch)), tmp_path / "dense.safetensors", arch=arch, data={"input_shape": [3, 32, 32]}
    )
    assert main(["prune", str(path), "--channels", "0.5", "--out", str(tmp_path / "out")]) == 0
    dense, small = ds.load(path), ds.load(tmp_path / "out" / "model.safetensors")
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in dense.parameters())


def test_errors_are_one_line(files, tmp_path, capsys):
    gated, converted = files
    assert main(["prune", str(converted), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        "dynsparse prune: error: nothing to prune; pass --unstructured R and/or --channels / --neurons / --heads R\n"
    )
    assert not (tmp_path / "o").exists()
    for value in ("1", "-0.1", "half"):
        with pytest.raises(SystemExit):
            main(["prune", str(gated), "--unstructured", value, "--out", str(tmp_path / "o")])
        assert "argument --unstructured:" in capsys.readouterr().err


def _weights(model):
    layers = [m for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    return [(int((m.weight == 0).sum()), m.weight.numel()) for m in layers]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_of_a_gated_file_counts_the_weights_conversion_keeps(files, tmp_path, scope, capsys):
    """The fraction is of the converted model's weights, not of the gated model's (closed units included)."""
    gated, _ = files
    out = tmp_path / "out"
    assert main(["prune", str(gated), "--unstructured", "0.5", "--scope", scope, "--out", str(out)]) == 0
    w = _weights(ds.load(out / "model.safetensors"))
    zero, total = sum(z for z, _ in w), sum(n for _, n in w)
    if scope == "global":
        assert zero == round(0.5 * total)
    else:
        assert all(z == round(0.5 * n) for z, n in w)
    printed = capsys.readouterr().out
    assert "wrote model.safetensors, plan.json\n" in printed  # no gated file: its gates are unchanged
    assert f"Linear / Conv2d weights: {zero:,} of {total:,} zero ({100 * zero / total:.1f}%)\n" in printed


def test_units_and_weights_together(files, tmp_path):
    gated, _ = files
    out = tmp_path / "out"
    assert main(["prune", str(gated), "--heads", "0.5", "--unstructured", "0.5", "--out", str(out)]) == 0
    small = ds.load(out / "model.safetensors")
    w = _weights(small)
    assert sum(z for z, _ in w) == round(0.5 * sum(n for _, n in w))
    back = ds.load_gated(out / "gated.safetensors")[0].eval()  # the fixed gates, without the zeros
    assert ds.convert(back).blocks[0].attn.num_heads == small.blocks[0].attn.num_heads == 1


def test_a_dimension_the_model_does_not_have_names_the_file_and_flag(files, tmp_path, capsys):
    gated, _ = files
    assert main(["prune", str(gated), "--channels", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse prune: error: {gated}: --channels 0.5: cannot gate 'channels'")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_a_converted_file_is_pruned_again_and_its_plan_stays_relative_to_the_host(files, tmp_path):
    """Units of a sliced model file are pruned again: the saved plan composes both conversions (reloads exactly)."""
    _, converted = files
    assert main(["prune", str(converted), "--neurons", "0.5", "--out", str(tmp_path / "o")]) == 0
    once, twice = ds.load(converted), ds.load(tmp_path / "o" / "model.safetensors")
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in once.parameters())
    gated, _ = ds.load_gated(tmp_path / "o" / "gated.safetensors")
    x = torch.randn(2, *DATA["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(twice(x), ds.convert(gated)(x), rtol=0, atol=1e-6)


def test_row_scope_prunes_each_output_row_and_is_refused_for_units(files, tmp_path, capsys):
    _, converted = files
    out = tmp_path / "row"
    assert main(["prune", str(converted), "--unstructured", "0.5", "--scope", "row", "--out", str(out)]) == 0
    m = ds.load(out / "model.safetensors")
    w = m.blocks[1].mlp.fc1.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    assert main(["prune", str(converted), "--neurons", "0.5", "--scope", "row", "--out", str(tmp_path / "u")]) == 2
    assert "--scope row" in capsys.readouterr().err

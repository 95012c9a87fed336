"""``dynsparse analyse MODEL``: per-layer shapes, kept fractions, FLOPs and gates of converted and gated files."""

from __future__ import annotations

import json

import pytest
import torch
from cli_models import ARCH, write_files

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.convert.io import build_host
from dynsparse.flops import count_flops


@pytest.fixture
def files(tmp_path):
    return write_files(tmp_path)


def _analyse(path, tmp_path, *flags):
    out = tmp_path / "a.json"
    assert main(["analyse", str(path), "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


def test_a_converted_file_against_its_dense_architecture(files, tmp_path, capsys):
    _, converted = files
    a = _analyse(converted, tmp_path)
    rows = {r["name"]: r for r in a["layers"]}
    qkv = rows["blocks.1.attn.qkv"]  # one of two heads kept
    assert (qkv["type"], qkv["shape"], qkv["dense_shape"]) == ("Linear", [48, 32], [96, 32])
    assert qkv["kept"] == pytest.approx(0.5) and qkv["weight_nonzero"] == 1.0 and qkv["flops"] > 0
    fc1 = rows["blocks.1.mlp.fc1"]  # three quarters of the neurons kept
    assert (fc1["shape"], fc1["dense_shape"]) == ([96, 32], [128, 32])
    assert rows["blocks.1.norm1"]["type"] == "LayerNorm" and rows["patch_embed.proj"]["type"] == "Conv2d"
    assert a["removed_layers"] == ["blocks.0.norm2", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]  # block 0's MLP closed
    model, dense = ds.load(converted), build_host(ARCH)
    x = torch.zeros(1, 1, 8, 8)
    t = a["totals"]
    assert (t["flops"], t["dense_flops"]) == (count_flops(model, x), count_flops(dense, x))
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["nonzero_params"] == sum(int((p != 0).sum()) for p in model.parameters())  # timm's biases start at 0
    assert t["dense_params"] == sum(p.numel() for p in dense.parameters())
    assert a["gates"] == [] and a["kind"] == "converted"
    printed = capsys.readouterr().out
    assert "blocks.1.attn.qkv" in printed and "removed (in the dense architecture only): 3 layers" in printed
    assert f"FLOPs / input: {t['flops'] / 1e3:.2f}k of {t['dense_flops'] / 1e3:.2f}k dense" in printed


def test_a_gated_file_lists_its_gates_and_the_converted_estimate(files, tmp_path, capsys):
    gated, converted = files
    a = _analyse(gated, tmp_path)
    gates = {g["name"]: g for g in a["gates"]}
    assert gates["blocks.0.attn.norm.gate"] == {
        "name": "blocks.0.attn.norm.gate",
        "type": "FixedGate",
        "dimension": "heads",
        "kept": 1,
        "total": 2,
    }
    assert (gates["blocks.1.mlp.norm.gate"]["kept"], gates["blocks.1.mlp.norm.gate"]["total"]) == (96, 128)
    assert gates["blocks.0.drop_path2.gate"]["kept"] == 0 and gates["blocks.0.drop_path2.gate"]["dimension"] == "layers"
    assert all(r["kept"] == 1.0 for r in a["layers"])  # the gated model still holds every unit
    t = a["totals"]
    assert t["params"] == t["dense_params"]
    x = torch.zeros(1, 1, 8, 8)
    assert t["converted_flops_estimate"] == pytest.approx(count_flops(ds.load(converted), x), rel=1e-6)
    assert "after `dynsparse convert`:" in capsys.readouterr().out


def test_top_keeps_the_layers_with_most_flops(files, tmp_path, capsys):
    _, converted = files
    a = _analyse(converted, tmp_path, "--top", "2")
    lines = capsys.readouterr().out.splitlines()
    assert f"the 2 of {len(a['layers'])} layers with the most FLOPs" in lines
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    biggest = sorted(a["layers"], key=lambda r: r["flops"] or 0, reverse=True)[:2]
    assert [line.split()[0] for line in lines[head + 1 : head + 3]] == [r["name"] for r in biggest]
    assert not lines[head + 3].startswith("blocks")


def test_without_an_input_shape_everything_but_flops(tmp_path, capsys):
    _, converted = write_files(tmp_path, data=None)
    a = _analyse(converted, tmp_path)
    assert a["input_shape"] is None and a["totals"]["flops"] is None and all(r["flops"] is None for r in a["layers"])
    assert "FLOPs: no input shape stored in the file; pass --input C,H,W" in capsys.readouterr().out
    assert _analyse(converted, tmp_path, "--input", "1,8,8")["totals"]["flops"] > 0


def test_bad_inputs_are_one_line(files, tmp_path, capsys):
    _, converted = files
    assert main(["analyse", str(converted), "--input", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse analyse: error: {converted}: an input of shape 3x8x8 (--input) does not run")
    not_a_model = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(not_a_model))
    assert main(["analyse", str(not_a_model)]) == 2
    assert capsys.readouterr().err == (
        f"dynsparse analyse: error: {not_a_model}: not a dynsparse model file (metadata 'format' is None)\n"
    )
    with pytest.raises(SystemExit):
        main(["analyse", str(converted), "--top", "0"])
    assert "argument --top:" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_sparsity_of_an_unstructured_prune_is_shown(files, tmp_path, scope, capsys):
    """The totals state the Linear / Conv2d weights' non-zero fraction (the all-parameter one counts biases, norms)."""
    _, converted = files
    out = tmp_path / "pruned"
    assert main(["prune", str(converted), "--unstructured", "0.5", "--scope", scope, "--out", str(out)]) == 0
    a = _analyse(out / "model.safetensors", tmp_path)
    t = a["totals"]
    assert t["nonzero_weights"] == t["weights"] - round(0.5 * t["weights"])
    assert t["params"] - t["weights"] > 0  # biases and norms: not pruned, not in the weights' fraction
    printed = capsys.readouterr().out
    assert f"Linear / Conv2d weights: {t['weights']:,}, non-zero {t['nonzero_weights']:,} (50.0%)\n" in printed
    rows = [r for r in a["layers"] if r["type"] in ("Linear", "Conv2d")]
    if scope == "layer":
        assert all(r["weight_nonzero"] == pytest.approx(0.5, abs=0.01) for r in rows)
    else:
        assert len({round(r["weight_nonzero"], 2) for r in rows}) > 1  # global: layers end up differently


def test_json_naming_a_directory_is_one_line(files, tmp_path, capsys):
    _, converted = files
    assert main(["analyse", str(converted), "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"dynsparse analyse: error: --json {tmp_path}: is a directory")


def test_a_text_encoder_file_shows_its_text_data(tmp_path, capsys):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face extra")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ds.sparsify_(model, {"heads": "hard_concrete"})
    path = ds.save(
        ds.convert(model.eval()),
        tmp_path / "m.safetensors",
        data={"distill": ["english-sentences"], "max_length": 64, "tokenizer": "all-minilm-l6-v2"},
    )
    assert main(["analyse", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data: text, distilled on english-sentences, tokenizer all-minilm-l6-v2, up to 64 tokens" in out
    assert "not counted for a text encoder" in out and "pass --input" not in out


def test_a_threshold_token_gate_on_its_learned_thresholds(tmp_path, capsys):
    # a threshold token gate's default budget is keep=None (its learned θ): analyse raised TypeError on float(None)
    from dynsparse.convert.io import build_host

    model = build_host(ARCH).eval()
    ds.sparsify_(model, {"tokens": {"gate": "threshold", "blocks": [1]}})
    path = ds.save_gated(model, tmp_path / "gated.safetensors", arch=ARCH, data={"input_shape": [1, 8, 8]})
    a = _analyse(path, tmp_path, "--flops-inputs", "2")
    (row,) = [g for g in a["gates"] if g["type"] == "ThresholdTokenGate"]
    assert (row["kept"], row["keep"]) == (None, None)
    assert "per input, learned thresholds" in capsys.readouterr().out


def test_the_converted_estimate_of_a_per_input_model_is_the_mean_over_the_same_inputs(tmp_path):
    """A gated file with block routers: `after convert` equals `analyse` of its converted file (it was input 0's)."""
    from cli_models import DATA

    from dynsparse.convert.io import build_host

    torch.manual_seed(0)
    model = build_host(ARCH).eval()
    ds.sparsify_(model, {"depth": {"gate": "router", "blocks": "all", "keep": 0.5}})
    with torch.no_grad():  # routers that disagree across inputs (untrained ones run every block)
        for b in model.blocks:
            b.router.proj.weight.normal_(0, 2.0)
            b.router.proj.bias.zero_()
    gated = ds.save_gated(model, tmp_path / "gated.safetensors", arch=ARCH, data=DATA)
    converted = ds.save(ds.convert(model, static=False), tmp_path / "model.safetensors", arch=ARCH, data=DATA)
    g, c = _analyse(gated, tmp_path)["totals"], _analyse(converted, tmp_path)["totals"]
    assert g["flops_inputs"] == c["flops_inputs"] == 16
    assert g["converted_flops_estimate"] == pytest.approx(c["flops"], rel=1e-6)
    assert g["converted_flops_estimate"] == pytest.approx(g["flops"], rel=1e-6)

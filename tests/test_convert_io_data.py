"""The optional ``data`` metadata of model files: round trip, old files without it, refused and damaged values."""

from __future__ import annotations

import json

import pytest
import torch
from cli_models import ARCH, DATA, gated_model, write_files
from safetensors import safe_open
from safetensors.torch import save_file

import dynsparse as ds
from dynsparse.convert.io import read_info


def test_data_round_trips_in_converted_and_gated_files(tmp_path):
    gated, converted = write_files(tmp_path)
    assert read_info(converted) == {"kind": "converted", "arch": ARCH, "data": DATA, "gates": {}}
    info = read_info(gated)
    assert (
        info["kind"] == "gated"
        and info["data"] == DATA
        and set(info["gates"]) == set(f for f, _ in ds.named_gates(gated_model()))
    )
    assert ds.load_gated(gated)[1]["data"] == DATA


def test_files_without_data_still_load(tmp_path):
    gated, converted = write_files(tmp_path, data=None)
    with safe_open(str(converted), framework="pt") as f:
        assert "data" not in f.metadata()
    assert read_info(converted)["data"] is None and ds.load_gated(gated)[1]["data"] is None
    ds.load(converted)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"datset": "digits"}, "unknown field 'datset'. Did you mean 'dataset'?"),
        ({"input_shape": [1, 8]}, "field 'input_shape' must be \\[C, H, W\\]"),
        ({"input_shape": [1, 0, 8]}, "field 'input_shape'"),
        ({"channels": 2}, "field 'channels' must be 1, 3 or null"),
        ({"image_size": True}, "field 'image_size'"),
        ({"mean": [0.1], "std": []}, "'mean' and 'std' need the same length"),
        ({"mean": [0.1], "std": [0.0]}, "field 'std' must be positive numbers"),
        ({"input_shape": [3, 8, 8], "mean": [0.1], "std": [0.2]}, "one value per input channel \\(3\\)"),
        ({"channels": 3, "input_shape": [1, 8, 8]}, "'channels' \\(3\\) and the channels of 'input_shape' \\(1\\)"),
        ({"channels": 3, "mean": [0.1], "std": [0.2]}, "one value per input channel \\(3\\)"),
        ("digits", "expected an object"),
        (
            {"max_lenght": 64},
            "unknown field 'max_lenght'. Did you mean 'max_length'?.*max_length, tokenizer \\(text\\)",
        ),
        ({"dataset": "digits", "max_length": 64}, "fields \\['dataset'\\] describe images and \\['max_length'\\] text"),
        ({"distill": "english-sentences"}, "field 'distill' must be a non-empty list of text set names"),
        ({"distill": []}, "field 'distill'"),
        ({"max_length": 0}, "field 'max_length' must be a positive int"),
        ({"max_length": True}, "field 'max_length'"),
        ({"tokenizer": ""}, "field 'tokenizer'"),
    ],
)
def test_save_refuses_bad_data(tmp_path, data, match):
    model = ds.convert(gated_model())
    with pytest.raises(ds.ConfigError, match=match):
        ds.save(model, tmp_path / "m.safetensors", arch=ARCH, data=data)
    with pytest.raises(ds.ConfigError, match=match):
        ds.save_gated(gated_model(), tmp_path / "g.safetensors", arch=ARCH, data=data)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("value", "match"),
    [("{", "metadata field 'data' is not valid JSON"), (json.dumps({"input_shape": "1x8x8"}), "field 'input_shape'")],
)
def test_a_damaged_data_field_names_the_file(tmp_path, value, match):
    _, converted = write_files(tmp_path)
    with safe_open(str(converted), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "data": value})
    with pytest.raises(ds.DynsparseError, match=f"{bad}: .*{match}"):
        read_info(bad)
    ds.load(bad)  # the model itself does not need the field


def test_read_info_refuses_other_files(tmp_path):
    other = tmp_path / "x.safetensors"
    save_file({}, str(other), metadata={"format": "something else"})
    with pytest.raises(ds.DynsparseError, match=f"{other}: not a dynsparse model file"):
        read_info(other)
    with pytest.raises(ds.DynsparseError, match="no such file"):
        read_info(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("reader", [read_info, ds.load, ds.load_gated], ids=["read_info", "load", "load_gated"])
def test_a_directory_is_named_a_directory(tmp_path, reader):
    """A run's output folder given instead of one of its files says so, and names the model files inside it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ds.DynsparseError, match=f"^{empty}: is a directory, not a model file$"):
        reader(empty)
    gated, converted = write_files(tmp_path)
    assert gated.parent == converted.parent == tmp_path
    with pytest.raises(ds.DynsparseError, match=f"{tmp_path}: is a directory.*{converted.name}"):
        reader(tmp_path)


TEXT_DATA = {"distill": ["english-sentences", "rotten-tomatoes"], "max_length": 64, "tokenizer": "all-minilm-l6-v2"}


def test_a_gated_hf_bert_round_trips_with_text_data(tmp_path):
    """A gated BERT (heads, neurons, layers, width; frozen gates) is written by save_gated with the text data
    fields and rebuilt by load_gated with the same outputs; its converted model keeps the field too."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")
    from dynsparse.recipes.text_schema import DEFAULT_SPARSIFY

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ds.sparsify_(model, {d: dict(o) for d, o in DEFAULT_SPARSIFY.items()})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_alpha"):
                p.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    ds.fix_gates_(model)
    path = ds.save_gated(model, tmp_path / "gated.safetensors", data=TEXT_DATA)
    assert read_info(path)["data"] == TEXT_DATA
    back, meta = ds.load_gated(path)
    assert meta["data"] == TEXT_DATA and meta["arch"]["kwargs"] == {"add_pooling_layer": False}
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        a = back.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    converted = ds.save(ds.convert(back), tmp_path / "model.safetensors", data=TEXT_DATA)
    assert read_info(converted)["data"] == TEXT_DATA

"""``dynsparse eval MODEL --dataset NAME``: accuracy of a converted model, clear errors for data that does not fit."""

from __future__ import annotations

import pytest

import dynsparse as ds
from dynsparse.cli import main
from dynsparse.models import LeNet300100


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    model = ds.convert(LeNet300100(img_size=8))
    ds.save(model, path, arch={"name": "lenet_300_100", "library": "dynsparse", "kwargs": {"img_size": 8}})
    return path


def test_eval_prints_the_accuracy(model_file, capsys):
    assert main(["eval", str(model_file), "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{model_file}: test accuracy ") and out.endswith("% on 360 digits images\n")


@pytest.mark.parametrize("flags", [["--image-size", "16"], ["--channels", "3"]])
def test_images_that_do_not_fit_the_model_are_one_error_line(model_file, flags, capsys):
    assert main(["eval", str(model_file), "--dataset", "digits", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse eval: error: {model_file}: the digits test images (")
    assert "--image-size and --channels" in err and "Traceback" not in err


def test_eval_of_a_gated_checkpoint_equals_its_converted_model(tmp_path, capsys):
    """docs/cli.md: every command that reads a model file takes a gated checkpoint too (eval refused it)."""
    from cli_models import write_files

    gated, converted = write_files(tmp_path)
    assert main(["eval", str(gated)]) == 0
    acc_gated = capsys.readouterr().out.split("test accuracy ")[1]
    assert main(["eval", str(converted)]) == 0
    assert capsys.readouterr().out.split("test accuracy ")[1] == acc_gated


@pytest.mark.parametrize("flags", [[], ["--dataset", "digits"]])
def test_a_text_encoder_file_is_refused_in_one_line(tmp_path, flags, capsys):
    """A sentence-embedding run's model file stores text data: eval said 'pass --dataset', which cannot work."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face extra")
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    path = ds.save(
        ds.convert(model),
        tmp_path / "m.safetensors",
        data={"distill": ["english-sentences"], "max_length": 64, "tokenizer": "all-minilm-l6-v2"},
    )
    assert main(["eval", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynsparse eval: error: {path}: a text encoder (tokenizer all-minilm-l6-v2)")
    assert "pass --dataset" not in err and "report.json" in err and "Traceback" not in err

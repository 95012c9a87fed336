"""Second review of the sentence-embedding recipe (``dynsparse.recipes.text*``, ``dynsparse.data.text``): each test
failed before its fix (tiny random BERT and character tokenizer of ``tests/test_recipe_text.py``; never MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

from test_recipe_text import TINY, _tiny_encoder, _write, needs_text  # noqa: E402

from dynsparse.recipes import RecipeError  # noqa: E402
from dynsparse.recipes import text as text_mod  # noqa: E402
from dynsparse.recipes.tasks import load_task_recipe  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return _tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@needs_text
def test_probe_of_one_class_is_refused_before_training(tmp_path, encoder_dir):
    """``evaluate.probe_train: 1`` (one class) failed after both stages with scikit-learn's 'needs samples of at least
    2 classes' ValueError, naming no field; now a RecipeError naming the field, before the gate stage."""
    from dynsparse.recipes.text import run_text_recipe

    recipe = load_task_recipe(_write(tmp_path, TINY, encoder_dir), ["evaluate.probe_train=1"])
    match = r"evaluate\.probe_train: the 1 probe training text\(s\) of 'rotten-tomatoes' are all of one class"
    with pytest.raises(RecipeError, match=match):
        run_text_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "gates.pt").exists()


@needs_text
def test_a_fresh_run_forgets_the_gate_checkpoint_of_an_earlier_run(tmp_path, encoder_dir, monkeypatch):
    """A run started afresh in the directory of a finished one, killed in its gate stage before writing a checkpoint,
    then resumed: it resumed from the earlier run's ``gates.pt`` (stage done), so its ``log.jsonl`` lacked the gate
    steps after the kill. A fresh run now removes the earlier ``gates.pt`` as it does ``finetune.pt``."""
    from dynsparse.cli import main

    recipe = _write(tmp_path, TINY, encoder_dir)
    ref = tmp_path / "ref"
    assert main(["train", str(recipe), "--out", str(ref), "--no-progress"]) == 0
    out = tmp_path / "out"
    args = ["train", str(recipe), "--out", str(out), "--no-progress"]
    assert main(args) == 0  # the earlier run
    real, calls = text_mod.distillation_loss, {"n": 0}

    def dying(*a, **kw):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(text_mod, "distillation_loss", dying)
    with pytest.raises(KeyboardInterrupt):  # started afresh, killed at gate step 3, no step checkpoints
        main(args)
    monkeypatch.setattr(text_mod, "distillation_loss", real)
    assert main([*args, "--resume"]) == 0  # from the start of its own gate stage
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (ref, out)]
    assert logs[0] == logs[1]


def _distilbert_dir(path: Path, encoder_dir: Path) -> Path:
    cfg = transformers.DistilBertConfig(vocab_size=99, dim=32, n_heads=4, hidden_dim=64, n_layers=1)
    transformers.DistilBertModel(cfg).save_pretrained(path)
    for f in encoder_dir.iterdir():  # the tokenizer files
        if not (path / f.name).exists():
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.parametrize(
    ("folder", "match"),
    [
        ("distilbert", r"encoder\.path: .* holds a 'distilbert' model, not a BERT encoder"),
        ("empty", r"encoder\.path: .* holds no transformers config \(config\.json\)"),
    ],
)
def test_encoder_dir_of_another_model_is_refused_naming_the_field(tmp_path, encoder_dir, folder, match):
    """A DistilBERT folder failed with transformers' TypeError 'DistilBertModel.__init__() got an unexpected keyword
    argument add_pooling_layer', a folder without config.json with 'Unrecognized model ... model_type key' (a
    ValueError): neither named encoder.path; now RecipeErrors that do (the BERT check ran after the load)."""
    from dynsparse.recipes.text_encoder import load_encoder
    from dynsparse.recipes.text_schema import EncoderSpec

    path = tmp_path / folder
    path.mkdir()
    if folder == "distilbert":
        _distilbert_dir(path, encoder_dir)
    with pytest.raises(RecipeError, match=match):
        load_encoder(EncoderSpec(path=str(path)))


def test_a_distillation_set_named_twice_is_refused(tmp_path, encoder_dir):
    """``data.distill: [rotten-tomatoes, rotten-tomatoes]`` silently distilled on every sentence twice (and a
    ``train_subset`` could pick one sentence twice); now refused with the field and its line."""
    text = TINY.replace("distill: [rotten-tomatoes]", "distill: [rotten-tomatoes, rotten-tomatoes]")
    with pytest.raises(RecipeError, match=r"data\.distill\[1\] \(line 4\): 'rotten-tomatoes' is named twice"):
        load_task_recipe(_write(tmp_path, text, encoder_dir))

"""Second review of the sentence-embedding recipe (``dynsparse.recipes.text*``, ``dynsparse.data.text``): each test
failed before its fix (tiny random BERT and character tokenizer of ``tests/test_recipe_text.py``; never MiniLM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

from test_recipe_text import TINY, _tiny_encoder, _write, needs_text  # noqa: E402

from dynsparse.recipes import RecipeError  # noqa: E402
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

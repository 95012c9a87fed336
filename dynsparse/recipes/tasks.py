"""Recipe kinds: the ``task`` field of a recipe picks its schema and its runner.

* ``image-classification`` (the default when ``task`` is left out): `dynsparse.recipes.schema.Recipe`, run by
  `dynsparse.recipes.run.run_recipe`.
* ``sentence-embedding``: `dynsparse.recipes.text_schema.TextRecipe`, run by
  `dynsparse.recipes.text.run_text_recipe`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..registry import suggest
from .loader import apply_overrides, read_recipe_yaml
from .schema import Recipe, RecipeError, parse_recipe
from .text_schema import TextRecipe, parse_text_recipe

__all__ = ["TASKS", "load_task_recipe", "recipe_task", "run_task_recipe"]

#: The recipe kinds, by the value of ``task``.
TASKS = ("image-classification", "sentence-embedding")
DEFAULT_TASK = "image-classification"


def _task(data: dict[str, Any], lines: dict[str, int]) -> str:
    task = data.get("task", DEFAULT_TASK)
    if task not in TASKS:
        line = f" (line {lines['task']})" if "task" in lines else ""
        raise RecipeError(
            f"task{line}: unknown task {task!r}.{suggest(str(task), list(TASKS))} Known: {', '.join(TASKS)}"
        )
    return task


def recipe_task(path: str | os.PathLike) -> str:
    """The ``task`` of the recipe file at ``path`` (``image-classification`` when it has none)."""
    data, lines = read_recipe_yaml(Path(path))
    return _task(data, lines)


def load_task_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe | TextRecipe:
    """Load and validate a recipe of any kind; errors name the file, the field and its line.

    Args:
        path: A YAML recipe.
        overrides: ``KEY=VALUE`` overrides (``steps=20``, ``budget.target=0.4``), applied before validation.

    Returns:
        A `Recipe` (image classification) or a `TextRecipe` (``task: sentence-embedding``).

    Raises:
        RecipeError: an unknown ``task`` (the known ones are listed), or any field error of its schema.
    """
    path = Path(path)
    data, lines = read_recipe_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        task = _task(data, lines)
        if task == "sentence-embedding":
            return parse_text_recipe(data, lines)
        return parse_recipe({k: v for k, v in data.items() if k != "task"}, lines)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def run_task_recipe(
    recipe: Recipe | TextRecipe,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any] | None:
    """Run a recipe of any kind with its runner; returns its report."""
    if isinstance(recipe, TextRecipe):
        from .text import run_text_recipe

        return run_text_recipe(recipe, out_dir, resume=resume, progress=progress)
    from .run import run_recipe

    return run_recipe(recipe, out_dir, resume=resume, progress=progress)

"""Recipes: YAML-described training pipelines (stages of gates, regularizers, fine-tuning), trainer and runner.

Image recipes (`load_recipe`, `Recipe`) and sentence-embedding recipes (``task: sentence-embedding``,
`TextRecipe`); `load_task_recipe` / `run_task_recipe` read the ``task`` field and pick the right one.
"""

from .loader import apply_overrides, load_recipe, recipe_to_dict
from .schema import Recipe, RecipeError, parse_recipe
from .tasks import load_task_recipe, recipe_task, run_task_recipe
from .text_schema import TextRecipe

__all__ = [
    "Recipe",
    "RecipeError",
    "TextRecipe",
    "apply_overrides",
    "load_recipe",
    "load_task_recipe",
    "parse_recipe",
    "recipe_task",
    "recipe_to_dict",
    "run_task_recipe",
]

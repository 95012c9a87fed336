"""Recipes: YAML-described training pipelines (stages of gates, regularizers, fine-tuning), trainer and runner."""

from .loader import apply_overrides, load_recipe, recipe_to_dict
from .schema import Recipe, RecipeError, parse_recipe

__all__ = ["Recipe", "RecipeError", "apply_overrides", "load_recipe", "parse_recipe", "recipe_to_dict"]

"""Checkpoints of a sentence-embedding recipe run (`dynsparse.recipes.text.run_text_recipe`).

CPU copies of states, the torch RNG states, and the recipe fields each stage's result depends on: a checkpoint
written under other values of them is refused on resume (`load_stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .loader import recipe_to_dict
from .schema import RecipeError
from .text_schema import TextRecipe

__all__ = ["FINETUNE_FIELDS", "GATE_FIELDS", "fingerprint", "load_stage", "rng_state", "set_rng_state"]

#: Recipe fields (top-level, or ``section.field``) each stage's result depends on: a checkpoint written under other
#: values is not resumed. The gate stage never reads ``optimizer.finetune_lr``.
GATE_FIELDS = (
    "encoder",
    "data",
    "sparsify",
    "budget",
    "optimizer.lr",
    "optimizer.gate_lr",
    "optimizer.weight_decay",
    "loss",
    "steps",
    "seed",
)
FINETUNE_FIELDS = (*GATE_FIELDS, "optimizer.finetune_lr", "finetune_steps")


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch CPU RNG state, and the CUDA one of ``device`` when it is a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore RNG states written by `rng_state` (the CUDA one only on a GPU ``device``)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def fingerprint(recipe: TextRecipe, fields: tuple[str, ...]) -> dict[str, Any]:
    """The top-level recipe sections holding ``fields``, as plain data (stored in a checkpoint)."""
    plain = recipe_to_dict(recipe)
    return {k: plain[k] for k in dict.fromkeys(f.split(".")[0] for f in fields)}


def _field(plain: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of nested plain data (None where absent)."""
    for key in path.split("."):
        plain = plain.get(key) if isinstance(plain, dict) else None
    return plain


def load_stage(path: Path, recipe: TextRecipe, fields: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint at ``path``, if it was written by a recipe with the same ``fields``.

    Raises:
        RecipeError: the checkpoint's recipe differs in one of ``fields`` (the message names them).
    """
    ck = load_checkpoint(path)
    want, have = fingerprint(recipe, fields), ck.get("recipe", {})
    diff = sorted(k for k in fields if _field(want, k) != _field(have, k))
    if diff:
        raise RecipeError(
            f"{path}: written by a recipe that differs in {', '.join(diff)}; resume with the same recipe, or start "
            f"afresh without --resume (or in another output directory)"
        )
    return ck

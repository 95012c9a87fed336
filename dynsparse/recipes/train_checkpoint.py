"""Checkpoints of an image recipe run (`dynsparse.recipes.train.Trainer`): what one holds, and restoring from one.

A checkpoint holds the model (and teacher) state, the optimizer and budget states, the RNG states, and in
``meta`` the `RunState` (stage, epochs done, global step, log history), the class of every static gate, the gate
settings that live outside the state dict (a `TopKGate`'s ``k``, an input-dependent gate's run-time ``keep``; as
`dynsparse.convert.save_gated` records them) and the recipe. The structure is not in it: a resumed run rebuilds it
from the recipe, then `restore_` loads the states and puts the recorded settings back.
`check_resume` refuses a checkpoint whose recipe differs from the current one in a field that changes training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..convert.metadata import gate_settings, restore_gate_settings_
from ..errors import DynsparseError
from ..gate_ops import fix_gates_, named_gates
from ..gates import FixedGate, Gate
from .loader import recipe_to_dict
from .schema import Recipe, RecipeError

__all__ = ["RESUME_FIELDS", "RunState", "check_resume", "checkpoint_state", "gate_settings", "restore_"]

#: Top-level recipe fields the training depends on; the stages up to the checkpoint's are compared too (but their
#: names). The device may change (checkpoints hold CPU tensors), and so may name, output_dir, baseline, convert and
#: evaluate.
RESUME_FIELDS = ("model", "data", "seed")
#: Leaves under `RESUME_FIELDS` that do not change training (lowering the test batch after running out of memory in
#: evaluation is a normal reason to resume).
RESUME_FREE = ("data.eval_batch_size",)


@dataclass
class RunState:
    stage: int = 0
    epoch: int = 0  # epochs completed in `stage`
    step: int = 0  # global optimizer steps
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_state(
    model: nn.Module,
    teacher: nn.Module | None,
    opts: dict[str, torch.optim.Optimizer],
    budget: Any,
    state: RunState,
    recipe: Recipe,
    device: torch.device,
) -> dict[str, Any]:
    """The checkpoint of a run, tensors where they are (the caller moves them to the CPU before saving)."""
    gates = {f: type(g).__name__ for f, g in named_gates(model) if isinstance(g, Gate)}
    cuda = device.type == "cuda"
    return {
        "model": model.state_dict(),
        "teacher": teacher.state_dict() if teacher is not None else None,
        "optim": {k: o.state_dict() for k, o in opts.items()},
        "budget": budget.state_dict() if budget is not None else None,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None,
        "meta": {
            "stage": state.stage,
            "epoch": state.epoch,
            "step": state.step,
            "history": json.dumps(state.history),
            "gates": json.dumps(gates),
            "settings": json.dumps(gate_settings(model)),
            "recipe": json.dumps(recipe_to_dict(recipe)),
        },
    }


def restore_(model: nn.Module, teacher: nn.Module | None, ckpt: dict[str, Any], device: torch.device) -> nn.Module:
    """Load a checkpoint's states into the rebuilt ``model`` (and ``teacher``) in place and return ``model``.

    Gates the checkpoint records as `FixedGate` are fixed first (all open; the loaded state sets their masks); the
    recorded gate settings (`gate_settings`) are applied after the state (a `CatsGate` re-derives its threshold from
    the loaded quantiles and the restored ``keep``); the torch RNG state is restored, and the CUDA one on a GPU
    ``device`` when the checkpoint has one.

    Raises:
        RecipeError: a recorded setting has no gate of the right kind in the rebuilt model, or is refused by it.
    """
    classes = json.loads(ckpt["meta"]["gates"])
    fix = {
        f: torch.ones(g.num_units, dtype=torch.bool)
        for f, g in named_gates(model)
        if classes.get(f) == FixedGate.__name__ and not isinstance(g, FixedGate)
    }
    if fix:
        fix_gates_(model, fix)
    model.load_state_dict(ckpt["model"])
    if "settings" in ckpt["meta"]:  # absent in checkpoints written before the settings were recorded
        _restore_settings_(model, json.loads(ckpt["meta"]["settings"]))
    if teacher is not None and ckpt.get("teacher") is not None:
        teacher.load_state_dict(ckpt["teacher"])
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # absent in a CPU run's checkpoint
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    return model


def _restore_settings_(model: nn.Module, settings: dict[str, dict[str, Any]]) -> None:
    try:
        restore_gate_settings_(model, settings, "checkpoint gate setting")
    except DynsparseError as e:  # a malformed entry, no such gate, or a bad k or keep
        raise RecipeError(str(e)) from None


def _leaf_diff(a: Any, b: Any, path: str) -> list[str]:
    """The field paths at which the plain data ``a`` and ``b`` differ (mappings field by field)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _leaf_diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [path]


def check_resume(ckpt: dict[str, Any], recipe: Recipe, path: Any) -> None:
    """Refuse to resume ``ckpt`` (read from ``path``) under a ``recipe`` that trains differently.

    Compared with the recipe the checkpoint stores: `RESUME_FIELDS` and every field of the stages up to the
    checkpoint's stage but their names (labels only: two recipes' dense baselines are one run). Allowed: more
    stages, and another number of epochs of the stage the checkpoint stopped in while it had not finished (more
    than it has done: its end actions are still to come). A checkpoint without a stored recipe is not checked.

    Raises:
        RecipeError: naming the checkpoint file and every differing field.
    """
    stored = ckpt["meta"].get("recipe")
    if stored is None:
        return
    have, want = json.loads(stored), json.loads(json.dumps(recipe_to_dict(recipe)))
    stage, done = int(ckpt["meta"]["stage"]), int(ckpt["meta"]["epoch"])
    diff = [d for k in RESUME_FIELDS for d in _leaf_diff(have.get(k), want.get(k), k) if d not in RESUME_FREE]
    old, new = have.get("stages", []), want.get("stages", [])
    for i in range(stage + 1):
        a, b = ({k: v for k, v in s[i].items() if k != "name"} if i < len(s) else None for s in (old, new))
        if i == stage and a is not None and b is not None and done < a["epochs"] and b["epochs"] > done:
            a.pop("epochs"), b.pop("epochs")  # another number of epochs, more than ran, of an unfinished stage
        diff += _leaf_diff(a, b, f"stages[{i}]")
    if diff:
        raise RecipeError(
            f"{path}: written by a recipe that differs in {', '.join(diff)}; resume with the same recipe (more epochs "
            f"of the stage it stopped in, or more stages, may be added), or start afresh without --resume (or in "
            f"another output directory)"
        )

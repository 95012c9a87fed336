"""Sensitivity analysis of a recipe's model: ``dynsparse sensitivity RECIPE``.

The model analysed is, by default, the recipe's *dense* model: the leading stages that neither sparsify nor
prune are trained (or resumed) into ``OUT/dense``, the natural point to decide per-layer ratios before
pruning. With ``from_run`` it is the final model of a finished ``dynsparse train`` run of the same recipe.
Each layer (``group="element"``: the weight of each Linear/Conv) or gate (``"units"``: channels, heads or
neurons of each gate; dense models get fixed all-open gates first) is pruned alone at each ratio, without
retraining, and the model's test accuracy is recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import ConfigError
from .schema import Recipe, StageSpec
from .train import Trainer

__all__ = ["dense_prefix", "run_sensitivity"]


def _is_dense(st: StageSpec) -> bool:
    return not (st.sparsify or st.prune or st.regularizers or st.fix_gates or st.prune_vd or st.enforce_budget)


def dense_prefix(recipe: Recipe) -> Recipe:
    """The recipe cut to its leading dense stages (no gates, regularizers or pruning)."""
    stages = []
    for st in recipe.stages:
        if not _is_dense(st):
            break
        stages.append(st)
    if not stages:
        raise ConfigError(
            f"recipe {recipe.name!r}: its first stage already sparsifies; there is no dense model to analyse "
            "(train a dense stage first, or pass --from-run with a finished run)"
        )
    return dataclasses.replace(recipe, stages=tuple(stages), baseline=False, name=recipe.name + "-dense")


def run_sensitivity(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    from_run: str | os.PathLike | None = None,
    group: Literal["element", "units"] = "element",
    dimensions: Sequence[str] = ("channels", "heads", "neurons"),
    ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    layers: Sequence[str] | None = None,
    eval_samples: int | None = None,
    max_drop: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or load) the model, run `dynsparse.prune.sensitivity`, write ``sensitivity.{json,md,png}``.

    Args:
        recipe: The recipe.
        out_dir: Output directory.
        from_run: Output directory of a finished ``dynsparse train`` run of this recipe to analyse instead.
        group: ``"element"`` (each layer's weights) or ``"units"`` (each gate's units).
        dimensions: For ``units`` on a model without gates: the dimensions gated (fixed, all open) first.
        ratios: Fractions pruned.
        layers: Restrict to these weight / gate fqns.
        eval_samples: Evaluate on the first N test images only (faster; default all).
        max_drop: Also derive per-layer ratios that lose at most this many accuracy points.
        progress: Progress bars while training.

    Returns:
        ``{"model": ..., "baseline_acc", "ratios", "curves", "table", "plot", "ratios_for"}``.
    """
    from ..data import make_loader
    from ..prune import sensitivity

    ratios = [float(r) for r in ratios]
    if any(not 0.0 <= r < 1.0 for r in ratios):  # checked before any training, not after it
        raise ConfigError(f"--ratios: each ratio must be in [0, 1), got {ratios}")
    if eval_samples is not None and eval_samples < 1:
        raise ConfigError(f"--eval-samples: must be at least 1, got {eval_samples}")
    if max_drop is not None and not max_drop >= 0:
        raise ConfigError(f"--max-drop: accuracy points lost, at least 0, got {max_drop}")
    if max_drop is not None and 0.0 not in ratios:
        raise ConfigError(f"--max-drop needs ratio 0 among the --ratios (the unpruned accuracy), got {ratios}")
    if layers is not None and from_run is None:  # the dense model's names are known before it trains
        from .train import build_model

        _check_layers(_gated_for(build_model(recipe), group, dimensions), group, layers)
    out = Path(out_dir)
    if from_run is not None:
        run_dir = Path(from_run)
        if not (run_dir / "checkpoint.pt").is_file():
            raise ConfigError(f"--from-run {run_dir}: no checkpoint.pt there (the output dir of `dynsparse train`)")
        trainer = Trainer(recipe, run_dir, resume=True, progress=progress)
        source = f"final model of the run in {run_dir}"
    else:
        trainer = Trainer(dense_prefix(recipe), out / "dense", resume=True, progress=progress)
        source = f"dense model after stage(s) {[s.name for s in trainer.recipe.stages]} ({out / 'dense'})"
    model = _gated_for(trainer.run().eval(), group, dimensions)
    if layers is not None and from_run is not None:
        _check_layers(model, group, layers)
    test = trainer.test_set
    if eval_samples is not None:
        test = torch.utils.data.Subset(test, range(min(eval_samples, len(test))))
    loader = make_loader(test, recipe.data.eval_batch_size, shuffle=False, seed=0)
    result = sensitivity(model, lambda m: trainer._evaluate(m, loader), ratios=ratios, group=group, layers=layers)
    out.mkdir(parents=True, exist_ok=True)
    base = next(iter(result.curves.values()))[result.ratios.index(0.0)] if 0.0 in result.ratios else None
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "model": source,
        "group": group,
        "eval_samples": len(test),
        "ratios": result.ratios,
        "curves": result.curves,
        "baseline_acc": base,
    }
    if max_drop is not None:
        report["max_drop"] = max_drop
        report["ratios_for"] = result.ratios_for(base - max_drop / 100)
    table = result.table()
    atomic_write(out / "sensitivity.md", lambda p: Path(p).write_text(table + "\n"))
    atomic_write(out / "sensitivity.json", lambda p: Path(p).write_text(json.dumps(report, indent=1) + "\n"))
    report["table"] = table
    report["plot"] = str(
        result.plot(out / "sensitivity.png", title=f"{recipe.name}: {group} sensitivity", ylabel="test accuracy")
    )
    return report


def _gated_for(model: nn.Module, group: str, dimensions: Sequence[str]) -> nn.Module:
    """``model``, with fixed gates on ``dimensions`` for a ``units`` analysis of a model that has none."""
    from ..gate_ops import named_gates
    from ..sparsify import sparsify_

    if group == "units" and not list(named_gates(model)):
        sparsify_(model, {d: {"gate": "fixed"} for d in dimensions}, on_unsupported="skip")
    return model


def _check_layers(model: nn.Module, group: str, layers: Sequence[str]) -> None:
    """Refuse ``--layers`` names ``model`` does not have; before training, a model built with random weights has the
    same names as the one that will train."""
    from ..prune.sensitivity import analysable

    try:
        analysable(model, group, layers)
    except ConfigError as e:
        raise ConfigError(f"--layers: {e}") from None

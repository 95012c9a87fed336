"""Checks of a parsed image recipe beyond field types: value ranges, and fields a method needs or ignores.

`dynsparse.recipes.schema.parse_recipe` calls `check_ranges` and, per stage, `check_regularizer` and `check_prune`;
each raises a `RecipeError` that names the field path and, when the YAML loader gave one, its line. A field that
the chosen regularizer, pruning method or schedule does not read is refused when set to another value than its
default (the tables `REGULARIZER_FIELDS` and `prune_fields`), so a recipe never claims a setting that has no effect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..registry import suggest
from .schema import PruneSpec, Recipe, RecipeError, RegularizerSpec

__all__ = ["REGULARIZER_FIELDS", "check_prune", "check_ranges", "check_regularizer", "prune_fields"]

#: The fields of a `RegularizerSpec` that each regularizer reads (besides ``name``).
REGULARIZER_FIELDS: dict[str, tuple[str, ...]] = {
    "l0": ("weight",),
    "budget": ("target", "kind", "warmup_epochs", "lr"),
    "group_lasso": ("weight", "prox"),
    "bn_l1": ("weight",),
    "sparse_vd": ("weight", "kl_start", "kl_end"),
    "dynamic": ("weight",),
}

#: The fields `structured` pruning reads.
_STRUCTURED_FIELDS = (
    *("dimensions", "importance", "at", "scope", "normalize"),
    *("round_to", "max_ratio", "include", "exclude", "calibration_batches"),
)

#: Per-weight importances that score on ``calibration_batches`` training batches.
_BATCH_SCORES = ("gradient", "taylor", "obd", "wanda")


def fail(lines: dict[str, int], path: str, msg: str) -> None:
    """Raise a `RecipeError` naming ``path`` and its line."""
    line = f" (line {lines[path]})" if path in lines else ""
    raise RecipeError(f"{path}{line}: {msg}")


def _at_least(lines: dict[str, int], values: dict[str, Any], low: float, strict: bool = False) -> None:
    for path, v in values.items():
        if v is not None and (v <= low if strict else v < low):
            fail(lines, path, f"must be {'>' if strict else '>='} {low:g}, got {v}")


def check_ranges(recipe: Recipe, lines: dict[str, int]) -> None:
    """Value ranges of the data, evaluation, optimizer, schedule, distillation and regularizer fields, and the stage
    end actions that need a regularizer (``enforce_budget`` a budget in its stage, ``prune_vd`` sparse-VD layers)."""
    d, ev = recipe.data, recipe.evaluate
    positive = {
        "data.batch_size": d.batch_size,
        "data.eval_batch_size": d.eval_batch_size,
        "data.train_subset": d.train_subset,
        "data.image_size": d.image_size,
        "data.channels": d.channels,
        "evaluate.threads": ev.threads,
        "evaluate.rounds": ev.rounds,
        **{f"evaluate.batch_sizes[{i}]": b for i, b in enumerate(ev.batch_sizes)},
    }
    _at_least(lines, positive, 1)
    _at_least(lines, {"convert.atol": recipe.convert.atol}, 0)
    svd = False  # sparse-VD layers in the model by this stage (a stage's sparse_vd installs them, prune_vd removes)
    for i, st in enumerate(recipe.stages):
        p = f"stages[{i}]"
        _at_least(lines, {f"{p}.epochs": st.epochs}, 0)
        names = {r.name for r in st.regularizers}
        if st.enforce_budget and "budget" not in names:  # the trainer had nothing to enforce and skipped it
            fail(lines, f"{p}.enforce_budget", "needs a budget regularizer in this stage (its target is enforced)")
        svd = svd or "sparse_vd" in names
        if st.prune_vd and not svd:
            fail(lines, f"{p}.prune_vd", "needs sparse-VD layers: a sparse_vd regularizer in this or an earlier stage")
        svd = svd and not st.prune_vd
        for name, opt in (("optimizer", st.optimizer), ("gate_optimizer", st.gate_optimizer)):
            if opt is not None:
                _at_least(lines, {f"{p}.{name}.lr": opt.lr}, 0, strict=True)
                _at_least(
                    lines, {f"{p}.{name}.weight_decay": opt.weight_decay, f"{p}.{name}.momentum": opt.momentum}, 0
                )
        _at_least(lines, {f"{p}.schedule.warmup_epochs": st.schedule.warmup_epochs}, 0)
        if not 0 <= st.schedule.min_lr_ratio <= 1:
            fail(lines, f"{p}.schedule.min_lr_ratio", f"must be in [0, 1], got {st.schedule.min_lr_ratio}")
        if st.distill is not None:
            _at_least(lines, {f"{p}.distill.temperature": st.distill.temperature}, 0, strict=True)
            _at_least(lines, {f"{p}.distill.weight": st.distill.weight}, 0)
        for j, r in enumerate(st.regularizers):
            q = f"{p}.regularizers[{j}]"
            _at_least(lines, {f"{q}.weight": r.weight, f"{q}.warmup_epochs": r.warmup_epochs}, 0)
            _at_least(lines, {f"{q}.kl_start": r.kl_start, f"{q}.kl_end": r.kl_end}, 0)
            _at_least(lines, {f"{q}.lr": r.lr}, 0, strict=True)


def _unused(spec: Any, used: tuple[str, ...], by: str, path: str, lines: dict[str, int]) -> None:
    """Refuse a field of the dataclass ``spec`` outside ``used`` (and ``name`` / ``method``) set off its default."""
    for f in dataclasses.fields(spec):
        if f.name in ("name", "method") or f.name in used:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(spec, f.name) != default:
            fail(lines, f"{path}.{f.name}", f"{by} does not use this field; remove it (it uses {', '.join(used)})")


def check_regularizer(r: RegularizerSpec, path: str, lines: dict[str, int]) -> None:
    """A regularizer's own values, and no field that it ignores."""
    if r.name == "budget" and r.target is None:
        fail(lines, f"{path}.target", "the budget regularizer needs a target kept fraction")
    if r.name == "budget" and not 0 < r.target <= 1:
        fail(lines, f"{path}.target", f"must be in (0, 1], got {r.target}")
    _unused(r, REGULARIZER_FIELDS[r.name], f"regularizer {r.name!r}", path, lines)


def prune_fields(spec: PruneSpec) -> tuple[str, ...]:
    """The fields of ``spec`` that its method (and, for weights, its schedule and importance) reads."""
    if spec.method in ("unstructured", "magnitude"):
        used = ("ratio", "importance", "schedule", "scope", "include", "exclude")
        used += ("at",) if spec.schedule == "one_shot" else ("begin_epoch", "end_epoch", "frequency")
        return used + (("calibration_batches",) if spec.importance in _BATCH_SCORES else ())
    if spec.method == "structured":
        return _STRUCTURED_FIELDS
    if spec.method == "bn_scale":
        return ("ratio", "threshold", "scope", "min_keep", "at")
    return ("threshold", "min_keep", "at")  # group_lasso


def check_prune(spec: PruneSpec, epochs: int, p: str, lines: dict[str, int]) -> None:
    """Consistency of a `PruneSpec` beyond field types (which fields each method needs, and no ignored one)."""

    def bad(name: str, msg: str) -> None:
        fail(lines, f"{p}.{name}", msg)

    unstructured = spec.method in ("unstructured", "magnitude")
    if spec.method == "magnitude" and spec.importance != "magnitude":
        bad("importance", "method 'magnitude' scores by magnitude; use method 'unstructured' for other scores")
    if spec.ratio is not None and not 0.0 <= spec.ratio < 1.0:
        bad("ratio", f"must be a fraction in [0, 1), got {spec.ratio}")
    if unstructured and spec.ratio is None:
        bad("ratio", f"method {spec.method!r} needs the sparsity to reach (fraction of weights removed)")
    if spec.method == "bn_scale" and spec.ratio is None and spec.threshold is None:
        bad("ratio", "method 'bn_scale' needs a ratio or a threshold")
    if spec.scope == "row" and not unstructured:
        bad("scope", f"'row' ranks the weights of each output row (method unstructured), not units ({spec.method!r})")
    if spec.schedule != "one_shot" and not unstructured:
        bad("schedule", f"gradual schedules prune weights (method unstructured), not {spec.method!r}")
    end = spec.end_epoch if spec.end_epoch is not None else 0.75 * epochs
    if spec.schedule != "one_shot" and not 0 <= spec.begin_epoch < end <= epochs:
        bad(
            "end_epoch",
            f"the schedule must run within the stage: 0 <= begin_epoch {spec.begin_epoch} < end_epoch {end} "
            f"<= epochs {epochs}",
        )
    if spec.frequency < 1:
        bad("frequency", f"must be >= 1 step, got {spec.frequency}")
    if spec.calibration_batches < 1:
        bad("calibration_batches", f"must be >= 1, got {spec.calibration_batches}")
    if spec.round_to < 1:
        bad("round_to", f"must be >= 1, got {spec.round_to}")
    if spec.max_ratio is not None and not 0.0 <= spec.max_ratio <= 1.0:
        bad("max_ratio", f"must be a fraction in [0, 1], got {spec.max_ratio}")
    if spec.min_keep < 0:
        bad("min_keep", f"must be >= 0, got {spec.min_keep}")
    if spec.threshold is not None and spec.threshold < 0:
        bad("threshold", f"must be >= 0, got {spec.threshold}")
    if spec.method == "bn_scale" and spec.ratio is not None and spec.threshold is not None:
        bad("threshold", "method 'bn_scale' prunes to a ratio or below a threshold, not both")
    if spec.method == "bn_scale" and spec.threshold is not None and spec.scope == "layer":
        bad("scope", "a bn_scale threshold is global; scope 'layer' needs a ratio")
    if spec.method == "structured":
        from ..sparsify import DIMENSIONS

        if not spec.dimensions:
            bad("dimensions", "method 'structured' needs {dimension: fraction removed}, e.g. {channels: 0.5}")
        for dim, r in spec.dimensions.items():
            if dim not in DIMENSIONS:
                bad(
                    f"dimensions.{dim}",
                    f"structured pruning has no such dimension.{suggest(str(dim), DIMENSIONS)} "
                    f"Known: {', '.join(DIMENSIONS)}",
                )
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                bad(f"dimensions.{dim}", f"must be a fraction in [0, 1), got {r!r}")
    elif spec.dimensions is not None:
        bad("dimensions", f"only method 'structured' prunes dimensions, not {spec.method!r}")
    if unstructured or spec.method == "structured":
        _check_importance(spec, unstructured, bad)
    by = f"method {spec.method!r}"
    if unstructured:
        by += f" with schedule {spec.schedule!r} and importance {spec.importance!r}"
    _unused(spec, prune_fields(spec), by, p, lines)


def _check_importance(spec: PruneSpec, unstructured: bool, bad) -> None:
    from ..importance import IMPORTANCES, WEIGHT_IMPORTANCES

    registry = WEIGHT_IMPORTANCES if unstructured else IMPORTANCES
    name = spec.importance.get("name") if isinstance(spec.importance, dict) else spec.importance
    if unstructured and not isinstance(spec.importance, str):
        bad("importance", "a per-weight importance is a name")
    if isinstance(spec.importance, dict) and "name" not in spec.importance:
        bad("importance", f"needs a name: {{name: ..., **options}}, got {spec.importance!r}")
    if name not in registry.names():
        bad("importance", f"{name!r} is not one of {registry.names()}.{suggest(str(name), registry.names())}")
    if isinstance(spec.importance, dict):  # its options are the importance's constructor arguments: build it once
        from ..errors import ConfigError
        from ..importance import make_importance

        try:
            make_importance(spec.importance)
        except ConfigError as e:
            bad("importance", str(e))

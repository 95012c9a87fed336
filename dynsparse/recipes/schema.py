"""Recipe schema: frozen dataclasses, validated from plain data with errors that name the field and line.

A recipe is a model, a data set and a sequence of stages (dense warm-up, learned gates to a FLOPs target,
fine-tuning, ...), then conversion and evaluation. YAML is read only at the edge (`loader.py`); everything
here works on plain dicts, so recipes can also be built in Python.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import ConfigError
from ..registry import suggest

__all__ = [
    "ConvertSpec",
    "DataSpec",
    "DistillSpec",
    "EvaluateSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PruneSpec",
    "Recipe",
    "RegularizerSpec",
    "ScheduleSpec",
    "StageSpec",
    "parse_recipe",
]


class RecipeError(ConfigError):
    """A recipe field is unknown, missing or of the wrong type; names the field path and the line."""


@dataclass(frozen=True)
class ModelSpec:
    """The model: a timm name with kwargs, or a dynsparse built-in (``library: dynsparse``)."""

    name: str
    library: Literal["timm", "dynsparse"] = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """The data set (see ``dynsparse.data``) and the batch sizes."""

    dataset: str
    root: str | None = None
    image_size: int | None = None
    channels: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    train_subset: int | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9


@dataclass(frozen=True)
class ScheduleSpec:
    name: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class RegularizerSpec:
    """One regularizer of a stage.

    ``name``: ``l0`` (expected L0 of hard-concrete gates), ``budget`` (target-sparsity Lagrangian: ``target``
    kept fraction of ``kind`` flops/params, ``warmup_epochs``, multiplier ``lr``), ``group_lasso``, ``bn_l1``,
    ``sparse_vd`` (swap Linear/Conv for sparse variational dropout, KL ``weight`` with warm-up epochs
    ``kl_start``..``kl_end``). ``group_lasso`` with ``prox: true`` takes a proximal step after each update
    instead of adding the penalty to the loss.
    """

    name: Literal["l0", "budget", "group_lasso", "bn_l1", "sparse_vd"]
    weight: float = 1.0
    target: float | None = None
    kind: Literal["flops", "params"] = "flops"
    warmup_epochs: float = 0.0
    lr: float = 0.01
    kl_start: float = 0.0
    kl_end: float = 0.0
    prox: bool = False


@dataclass(frozen=True)
class PruneSpec:
    """Structured pruning at the end of a stage: keep masks from a score, frozen into the gates.

    ``method``: ``bn_scale`` (network slimming: |γ| of the BN before each channel gate), ``group_lasso``
    (norm of each unit's producer weights) — both give ``ratio`` (fraction of units pruned) or ``threshold`` —
    or ``magnitude``: unstructured pruning of Linear/Conv weights to sparsity ``ratio`` (``scope`` global or
    per layer, ``exclude`` fqn globs), kept as masks through later stages and made permanent before conversion.
    """

    method: Literal["bn_scale", "group_lasso", "magnitude"]
    ratio: float | None = None
    exclude: tuple[str, ...] = ()
    threshold: float | None = None
    scope: Literal["global", "layer"] = "global"
    min_keep: int = 1


@dataclass(frozen=True)
class DistillSpec:
    """Distillation from the model as it was at the start of the stage (KL on logits at temperature T)."""

    weight: float = 1.0
    temperature: float = 2.0


@dataclass(frozen=True)
class StageSpec:
    """One training stage.

    ``sparsify`` is a ``dynsparse.sparsify_`` spec applied at the start of the stage; ``fix_gates`` freezes
    every gate to its current keep mask at the start; ``enforce_budget`` closes the least likely units at
    the end so a ``budget`` target is met exactly; ``prune_vd`` zeroes sparse-VD weights with log α > 3 at
    the end.
    """

    name: str
    epochs: int
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    sparsify: dict[str, Any] | None = None
    regularizers: tuple[RegularizerSpec, ...] = ()
    gate_optimizer: OptimizerSpec | None = None
    distill: DistillSpec | None = None
    fix_gates: bool = False
    enforce_budget: bool = False
    prune_vd: bool = False
    prune: PruneSpec | None = None


@dataclass(frozen=True)
class ConvertSpec:
    enabled: bool = True
    atol: float = 1e-4


@dataclass(frozen=True)
class EvaluateSpec:
    latency: bool = True
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: int = 1
    rounds: int = 15


@dataclass(frozen=True)
class Recipe:
    """A whole recipe."""

    name: str
    model: ModelSpec
    data: DataSpec
    stages: tuple[StageSpec, ...]
    seed: int = 0
    output_dir: str = "runs/recipe"
    baseline: bool = False
    convert: ConvertSpec = field(default_factory=ConvertSpec)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, path: str, lines: dict[str, int]) -> Any:
    where = f"{path}" + (f" (line {lines[path]})" if path in lines else "")
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path, lines)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(
            errors[0]
            if len(errors) == 1
            else f"{where}: {value!r} matches none of {', '.join(_type_name(a) for a in args)}"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = suggest(str(value), [str(c) for c in choices])
            raise RecipeError(f"{where}: {value!r} is not one of {list(choices)}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{path}[{i}]", lines) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, lines)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise RecipeError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def _build(cls: type, data: Any, path: str, lines: dict[str, int]) -> Any:
    where = (path or "recipe") + (f" (line {lines[path]})" if path in lines else "")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            line = f" (line {lines[sub]})" if sub in lines else ""
            raise RecipeError(
                f"unknown field {sub!r}{line}.{suggest(str(key), list(fields))} "
                f"Known fields of {path or 'the recipe'}: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], sub, lines)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required field {(path + '.' if path else '') + name!r}")
    return cls(**kwargs)


def parse_recipe(data: dict[str, Any], lines: dict[str, int] | None = None) -> Recipe:
    """Validate plain recipe data and return a `Recipe`.

    Args:
        data: The recipe as nested dicts and lists.
        lines: Optional ``{field path: line}`` from the YAML loader, used in error messages.

    Raises:
        RecipeError: a field is unknown (with close matches), missing, or of the wrong type.
    """
    recipe = _build(Recipe, data, "", lines or {})
    if not recipe.stages:
        raise RecipeError("stages: a recipe needs at least one stage")
    if recipe.data.root is not None:
        import os

        if not os.path.isdir(recipe.data.root):
            line = f" (line {lines['data.root']})" if lines and "data.root" in lines else ""
            raise RecipeError(f"data.root{line}: directory {recipe.data.root!r} does not exist")
    for i, st in enumerate(recipe.stages):
        p = f"stages[{i}]"
        if st.epochs < 0:
            raise RecipeError(f"{p}.epochs: must be >= 0, got {st.epochs}")
        for j, r in enumerate(st.regularizers):
            if r.name == "budget" and r.target is None:
                raise RecipeError(f"{p}.regularizers[{j}].target: the budget regularizer needs a target kept fraction")
            if r.name == "budget" and not 0 < r.target <= 1:
                raise RecipeError(f"{p}.regularizers[{j}].target: must be in (0, 1], got {r.target}")
        if st.sparsify is not None:
            from ..sparsify import _parse_spec

            try:
                _parse_spec(st.sparsify)
            except ConfigError as e:
                raise RecipeError(f"{p}.sparsify: {e}") from None
    return recipe

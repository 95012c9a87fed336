"""What a stage's ``prune:`` spec does: one-shot or gradual (linear, AGP) pruning, driven by the trainer.

`StagePruning` turns a `PruneSpec` into calls of the library's own pruning functions, so a recipe prunes
exactly as the Python API does:

* ``unstructured`` (alias ``magnitude``): per-weight masks by `dynsparse.prune.unstructured_` with a score of
  `dynsparse.importance.WEIGHT_IMPORTANCES` (magnitude, random, gradient, taylor, obd, snip, grasp, synflow,
  wanda), once (``schedule: one_shot``, at the stage's ``start`` or ``end``) or along a ``linear`` / ``agp``
  schedule of the stage's steps, with training between the pruning steps (`dynsparse.prune.IterativePruner`).
* ``structured``: whole units (``dimensions: {channels: 0.5, heads: 0.25}``) scored by a structured importance
  (magnitude, taylor, activation, apoz, random) and frozen into fixed gates (`dynsparse.prune.structured_`).
* ``bn_scale`` / ``group_lasso``: keep masks from what a regularizer learned (network slimming, group norms).

The trainer calls `start_` when the stage starts, `step` after every optimizer step and `end_` after the last
epoch; `structure_` rebuilds only the structure (masked layers) when a run resumes, before its state is loaded.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .schema import PruneSpec, RecipeError, naming_field

__all__ = ["StagePruning"]


def _naming_the_field(method: Callable[..., Any]) -> Callable[..., Any]:
    """A library error in ``method`` (no gate or layer to prune, an importance that fails on this model) becomes a
    `RecipeError` naming the spec's field (``stages[2].prune: ...``): it may come long after the recipe loaded."""

    @functools.wraps(method)
    def wrapper(self: StagePruning, *args: Any, **kwargs: Any) -> Any:
        with naming_field(self.where):
            return method(self, *args, **kwargs)

    return wrapper


#: Per-weight importances that need batches ``(x, y)`` (the others need none, or only the input shape).
_DATA_SCORES = {"gradient": "data", "taylor": "data", "obd": "data", "wanda": "data", "snip": "batch", "grasp": "batch"}


class StagePruning:
    """Runs one stage's `PruneSpec` on a model.

    Args:
        model: The model being trained (pruned in place).
        spec: The stage's ``prune`` spec.
        epochs: The stage's epochs.
        steps_per_epoch: Optimizer steps per epoch.
        data: ``data() -> iterable of (x, y)`` batches for data-driven scores (the stage's training batches).
        example: One input ``(1, C, H, W)`` (SynFlow's input shape).
        where: Name of the spec in errors, e.g. ``"stages[2].prune"``.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: PruneSpec,
        *,
        epochs: int,
        steps_per_epoch: int,
        data: Callable[[], Iterable[Any]],
        example: Tensor,
        where: str = "prune",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.seed = seed  # of the random importance: a recipe's seed changes which weights random pruning removes
        self.spec = spec
        self.data = data
        self.example = example
        self.where = where
        self.unstructured = spec.method in ("magnitude", "unstructured")
        self.gradual = spec.schedule != "one_shot"
        self.pruner = None
        if self.gradual:
            from ..prune import IterativePruner, agp, linear

            total = epochs * steps_per_epoch
            end_epoch = spec.end_epoch if spec.end_epoch is not None else 0.75 * epochs
            begin, end = round(spec.begin_epoch * steps_per_epoch), round(end_epoch * steps_per_epoch)
            if not 0 <= begin < end <= total:
                raise ConfigError(
                    f"{where}: the schedule must run within the stage: begin_epoch {spec.begin_epoch} < end_epoch "
                    f"{end_epoch} <= epochs {epochs} (steps {begin}..{end} of {total})"
                )
            if spec.schedule == "agp":  # AGP updates every `frequency` steps by itself
                fn = functools.partial(
                    agp, initial=0.0, final=spec.ratio, begin=begin, end=end, frequency=spec.frequency
                )
            else:
                fn = _quantized(
                    functools.partial(linear, initial=0.0, final=spec.ratio, begin=begin, end=end),
                    spec.frequency,
                    begin,
                    end,
                )
            self._end = end
            self.pruner = IterativePruner(
                model,
                fn,
                importance=self._weight_scores if spec.importance != "magnitude" else "magnitude",
                scope=spec.scope,
                include=list(spec.include) or None,
                exclude=list(spec.exclude) or None,
            )

    # ------------------------------------------------------------------------------------------ hooks
    @_naming_the_field
    def structure_(self, ended: bool = False) -> None:
        """Only the structure this stage's pruning has created, for a resumed run: masked layers (all kept), or
        the open gates `structured` pruning closes units of, once it has run (``at: start``, or ``ended``)."""
        if self.unstructured:
            self._unstructured(0.0, "magnitude")
        elif self.spec.method == "structured" and (self.spec.at == "start" or ended):
            from ..prune.structured import open_gates_

            open_gates_(
                self.model,
                list(self.spec.dimensions),
                include=list(self.spec.include) or None,
                exclude=list(self.spec.exclude) or None,
            )

    @_naming_the_field
    def start_(self) -> None:
        """At the start of the stage: install masked layers (gradual), or prune now (``at: start``)."""
        if self.gradual:
            self.structure_()
            self.pruner.step(0)
        elif self.spec.at == "start":
            self._prune_once()

    @_naming_the_field
    def step(self, step_in_stage: int) -> bool:
        """After an optimizer step: follow the schedule; returns whether the masks changed."""
        return self.pruner.step(step_in_stage + 1) if self.pruner is not None else False

    @_naming_the_field
    def end_(self) -> None:
        """After the last epoch: the final target of a schedule, or the one-shot pruning ``at: end``."""
        if self.gradual:
            self.pruner.step(self._end)  # the final target; a no-op when the last steps reached it already
        elif self.spec.at == "end":
            self._prune_once()

    # ---------------------------------------------------------------------------------------- actions
    def _prune_once(self) -> None:
        spec = self.spec
        if self.unstructured:
            self._unstructured(spec.ratio, spec.importance)
        elif spec.method == "structured":
            from ..prune import structured_

            data = list(itertools.islice(self.data(), spec.calibration_batches))
            structured_(
                self.model,
                dict(spec.dimensions),
                importance=spec.importance,
                data=data,
                scope=spec.scope,
                normalize=spec.normalize,
                round_to=spec.round_to,
                max_sparsity=spec.max_ratio,
                include=list(spec.include) or None,
                exclude=list(spec.exclude) or None,
            )
        else:
            from ..gate_ops import fix_gates_

            if spec.method == "bn_scale":
                from ..regularizers.bn_l1 import BNScaleL1

                masks = BNScaleL1(self.model).keep_masks(
                    spec.ratio, threshold=spec.threshold, scope=spec.scope, min_keep=spec.min_keep
                )
            else:
                from ..regularizers.group_lasso import GroupLasso

                threshold = 1e-5 if spec.threshold is None else spec.threshold  # 0: only groups of norm 0
                masks = GroupLasso(self.model).keep_masks(threshold, min_keep=spec.min_keep)
            fix_gates_(self.model, masks)

    def _unstructured(self, ratio: float | None, importance: str) -> None:
        from ..prune import unstructured_

        scores = "magnitude" if importance == "magnitude" or not ratio else self._weight_scores(self.model, ratio)
        unstructured_(
            self.model,
            ratio or 0.0,
            importance=scores,
            scope=self.spec.scope,
            include=list(self.spec.include) or None,
            exclude=list(self.spec.exclude) or None,
        )

    def _weight_scores(self, model: nn.Module, ratio: float | None = None) -> dict[str, Tensor]:
        """``{param_fqn: scores}`` of the spec's per-weight importance on the current model."""
        from ..importance import WEIGHT_IMPORTANCES

        name, spec = self.spec.importance, self.spec
        fn = WEIGHT_IMPORTANCES.get(name)
        sel = {"include": list(spec.include) or None, "exclude": list(spec.exclude) or None}
        kind = _DATA_SCORES.get(name)
        if kind == "batch":
            return fn(model, F.cross_entropy, next(iter(self.data())), **sel)
        if kind == "data" and name == "wanda":
            return fn(model, self.data(), max_batches=spec.calibration_batches, **sel)
        if kind == "data":
            return fn(model, F.cross_entropy, self.data(), max_batches=spec.calibration_batches, **sel)
        if name == "synflow":
            target = ratio if ratio is not None else (self.pruner.target if self.pruner else 0.0) or 0.0
            return fn(model, tuple(self.example.shape[1:]), sparsity=target, **sel)
        if name == "random":
            return fn(model, torch.Generator().manual_seed(self.seed), **sel)
        if name == "movement":
            raise RecipeError(f"{self.where}.importance: 'movement' needs a MovementTracker; use the Python API")
        return fn(model, **sel)


def _quantized(fn: Callable[[int], float], frequency: int, begin: int, end: int) -> Callable[[int], float]:
    """The schedule read only at ``begin + k·frequency`` and at ``end`` (a linear ramp would change every step)."""

    def schedule(step: int) -> float:
        if begin < step < end:
            step = begin + (step - begin) // frequency * frequency
        return fn(step)

    return schedule

"""``structured_``: score units, keep the best, freeze the decision into gates (then ``ds.convert`` acts)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError

__all__ = ["open_gates_", "structured_"]


def structured_(
    model: nn.Module,
    sparsity: Mapping[str, float] | Sequence[str],
    *,
    importance: Any = "magnitude",
    data: Iterable[Any] | None = None,
    scope: Literal["global", "layer"] | None = None,
    flops: float | None = None,
    example_input: Any = None,
    normalize: Literal["none", "l2", "mean"] = "none",
    round_to: int = 1,
    max_sparsity: float | None = None,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> nn.Module:
    """Prune whole units in place: ``{dimension: fraction removed}`` → scores → keep masks → fixed gates.

    Dimensions not gated yet get ``fixed`` (all-open) gates through `dynsparse.sparsify_` first; then the
    importance (a name of `dynsparse.importance.IMPORTANCES`, ``{"name": ..., **kwargs}``, or an `Importance`)
    scores every unit, `dynsparse.importance.keep_masks` ranks them per dimension (``scope="layer"`` within
    each gate, ``"global"`` across the dimension's gates, optionally normalised), and `dynsparse.fix_gates_`
    records the decision. Call `dynsparse.convert` for the physically smaller model.

    Units the gates close already stay closed: they rank below every open unit and the new keep mask is AND-ed
    with the gate's current ``keep_mask()``, so pruning again after fine-tuning (``{"neurons": 0.25}``, train,
    then ``{"neurons": 0.5}``) closes more units and never re-opens one. The fractions are of all the gate's
    units, closed ones included. A learned gate (hard-concrete, ...) is replaced by a fixed gate holding its
    current hard decision narrowed further; its kept units get multiplier 1.

    With ``flops=f`` the budget is the model's FLOPs instead of unit counts: ``sparsity`` is then a list of
    dimensions, their units are ranked together by score per FLOP (`dynsparse.importance.flops_keep_masks`)
    and closed until the model keeps the fraction ``f`` of its FLOPs, so different importances end at the same
    FLOPs and differ only in where they cut.

    Args:
        model: A timm model (gated or not).
        sparsity: ``{"channels": 0.5, "heads": 0.25, ...}``, fraction of each dimension's units removed; with
            ``flops``, the dimensions to prune, e.g. ``["channels"]``.
        importance: How to score units (``"magnitude"``, ``"taylor"``, ``"activation"``, ``"apoz"``, ...).
        data: Batches ``(x, y)`` for data-driven scores (Taylor, activations).
        scope: Rank within each gate (``"layer"``, the default) or across all gates of the dimension
            (``"global"``); ``flops`` always ranks globally, and so do the ``layers`` branch gates (one unit
            each: within its own gate a fraction would close every branch or none).
        flops: Fraction of the model's FLOPs to keep, in (0, 1] (None: prune by ``sparsity`` fractions).
        example_input: One input for counting FLOPs with ``flops`` (default: the first batch of ``data``, one
            sample, else the timm model's default input).
        normalize: Per-gate score normalisation before a global ranking.
        round_to: Kept counts per gate rounded to multiples of this.
        max_sparsity: At most this fraction removed from any one gate.
        include: fqn globs of the modules to gate (only for dimensions not gated yet).
        exclude: fqn globs of the modules not to gate.

    Returns:
        ``model``, with fixed gates.

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = timm.create_model("test_resnet")
        >>> _ = ds.prune.structured_(m, {"channels": 0.5})
        >>> small = ds.convert(m)
    """
    from ..gate_ops import fix_gates_
    from ..importance import keep_masks

    if flops is not None:
        return _structured_flops(
            model, sparsity, flops, importance, data, scope, example_input, normalize, round_to, max_sparsity,
            include, exclude,
        )  # fmt: skip
    if not isinstance(sparsity, Mapping) or not sparsity:
        raise ConfigError(f"structured_: sparsity must be a mapping like {{'channels': 0.5}}, got {sparsity!r}")
    for dim, s in sparsity.items():
        if not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"structured_: sparsity[{dim!r}] must be a fraction in [0, 1), got {s!r}")
    scores = _scores(model, list(sparsity), importance, data, include, exclude)
    current = _current(model, scores)
    masks = {}
    for dim, s in sparsity.items():
        if s > 0:
            masks.update(
                keep_masks(
                    scores[dim],
                    s,
                    scope="global" if dim == "layers" else scope or "layer",  # a one-unit gate: all or nothing
                    normalize=normalize,
                    round_to=round_to,
                    max_sparsity=max_sparsity,
                    current=current,
                    may_close=set(scores[dim]) if dim == "layers" else (),  # a one-head heads gate keeps its head
                )
            )
    return fix_gates_(model, _narrowed(masks, current)) if masks else model


def _current(model: nn.Module, scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{gate_fqn: keep_mask()}`` on the CPU, now, of every gate in ``scores`` (``{dim: {gate_fqn: ...}}``)."""
    from ..gate_ops import named_gates

    fqns = {f for per_dim in scores.values() for f in per_dim}
    return {f: g.keep_mask().detach().cpu() for f, g in named_gates(model) if f in fqns}


def _narrowed(masks: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Each new keep mask AND-ed with the gate's current one: a closed unit stays closed."""
    return {f: m & current[f] if f in current else m for f, m in masks.items()}


def _scores(model, dims: list[str], importance, data, include, exclude) -> dict[str, dict[str, Any]]:
    """Open gates for ``dims`` where missing, score every unit: ``{dim: {gate_fqn: scores}}``."""
    from ..importance import make_importance
    from ..layers.slot import GateSlot

    open_gates_(model, dims, include=include, exclude=exclude)
    slots = {fqn: m for fqn, m in model.named_modules() if isinstance(m, GateSlot)}
    scorer = make_importance(importance)
    scores = scorer(model, data)
    name = getattr(scorer, "__name__", type(scorer).__name__)
    for f in scores:
        if f.rpartition(".")[0] not in slots:
            raise ConfigError(
                f"structured_: the importance {name} scored {f!r}, which names no gate of the model (keys are gate "
                f"fqns like {next((f'{s}.gate' for s in slots), 'blocks.0.mlp.norm.gate')!r})"
            )
    out = {}
    for dim in dims:
        out[dim] = {f: v for f, v in scores.items() if slots[f.rpartition(".")[0]].dimension == dim}
        if not out[dim]:
            raise ConfigError(f"structured_: the importance {name} gave no scores for {dim!r}")
    return out


def _structured_flops(
    model, dims, flops, importance, data, scope, example_input, normalize, round_to, max_sparsity, include, exclude
) -> nn.Module:
    """``structured_(..., flops=f)``: one score-per-FLOP ranking over the dimensions' gates."""
    from ..flops import CostModel
    from ..gate_ops import fix_gates_
    from ..importance import flops_keep_masks

    if isinstance(dims, (Mapping, str)) or not isinstance(dims, Sequence) or not dims:
        raise ConfigError(
            f"structured_: with flops=..., give the dimensions to prune as a list like ['channels'], got {dims!r}"
            " (the FLOPs budget replaces per-dimension fractions)"
        )
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0.0 < flops <= 1.0:
        raise ConfigError(f"structured_: flops must be the kept fraction of the model's FLOPs in (0, 1], got {flops!r}")
    if scope == "layer":
        raise ConfigError("structured_: flops=... ranks units across gates; scope='layer' does not apply")
    if example_input is None and data is not None:  # before scoring, which may exhaust a one-shot iterator
        first, data = _peek(data)
        if first is not None:
            x = first[0] if isinstance(first, (tuple, list)) else first
            example_input = x[:1]
    scores = _scores(model, list(dims), importance, data, include, exclude)
    current = _current(model, scores)
    mine = {}
    for per_dim in scores.values():
        mine.update(per_dim)
    cost = CostModel(model, example_input)
    masks = flops_keep_masks(
        mine,
        cost,
        float(flops),
        normalize=normalize,
        round_to=round_to,
        max_sparsity=max_sparsity,
        current=current,
        may_close=set(scores.get("layers", ())),
    )
    return fix_gates_(model, _narrowed(masks, current))


def _peek(data: Iterable[Any]) -> tuple[Any, Iterable[Any]]:
    """The first batch of ``data`` (None when empty) and an iterable that still yields every batch."""
    it = iter(data)
    if it is not data:  # a re-iterable container: it starts over by itself
        return next(it, None), data
    first = next(it, None)
    return first, ([] if first is None else itertools.chain([first], it))


def open_gates_(
    model: nn.Module,
    dimensions: Iterable[str],
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> nn.Module:
    """Give the ``dimensions`` that have no gate yet ``fixed`` all-open gates (in place); returns ``model``.

    The structure `structured_` prunes in, without scoring anything: a resumed training run rebuilds it before it
    loads the pruned masks.
    """
    from ..layers.slot import GateSlot
    from ..sparsify import sparsify_

    have = {m.dimension for m in model.modules() if isinstance(m, GateSlot)}
    missing = sorted({d for d in dimensions if d not in have})
    if missing:
        sparsify_(model, {d: {"gate": "fixed"} for d in missing}, include=include, exclude=exclude)
    return model

"""Scores to keep masks under a FLOPs budget: close the units that cost the most FLOPs per unit of score.

`keep_masks` ranks units by score alone, so a global ranking says nothing about what a unit costs: a channel of
a 56×56 stage and one of a 7×7 stage count the same. `flops_keep_masks` ranks by **score per FLOP** instead (the
greedy answer to the knapsack "keep the most score within this many FLOPs") and stops when the model keeps the
asked fraction of its FLOPs, so every criterion lands on the same FLOPs and decides only *where* to cut.

The cost of a unit comes from `dynsparse.flops.CostModel`: the kept FLOPs are a multilinear function of the
gates' kept fractions, so the FLOPs one more closed unit saves is exact for that step and is recomputed after
every step (closing channels of one gate makes the next gate's channels cheaper where they share a conv).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError
from .masks import (
    NORMALIZATIONS,
    _choice,
    _closable,
    _closed_first,
    _current_masks,
    _first_pruned,
    _fraction,
    _normalized_all,
    _prune_order,
    _score_tensors,
)

if TYPE_CHECKING:
    from ..flops import CostModel

__all__ = ["flops_keep_masks"]

log = logging.getLogger(__name__)


def flops_keep_masks(
    scores: Mapping[str, Tensor],
    cost: CostModel,
    keep: float,
    *,
    normalize: str = "none",
    round_to: int = 1,
    max_sparsity: float | None = None,
    min_keep: int = 1,
    current: Mapping[str, Tensor] | None = None,
    may_close: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Keep masks that bring the model to ``keep`` of its FLOPs, closing the lowest score per FLOP first.

    Greedy: at each step every gate offers its next lowest-scored unit (or group of ``round_to`` units), valued
    at its (normalised) score divided by the FLOPs closing it saves now; the cheapest offer per FLOP is taken,
    and the costs are recomputed. It stops at the first step where the kept fraction is ``<= keep`` (so it
    overshoots by at most one unit's or group's FLOPs), or when no gate may close more (then it logs a warning).
    Gates of ``cost`` without scores keep their current masks and count with their current cost. With
    ``current`` (the scored gates' keep masks now), a scored gate's closed units stay closed and count as pruned
    from the start, as in `keep_masks`.

    Args:
        scores: ``{gate_fqn: (num_units,) scores}``, higher = keep; must be >= 0 after ``normalize`` (a score
            per FLOP of a negative score has no meaning).
        cost: A `dynsparse.flops.CostModel` (``kind="flops"`` or ``"params"``) of the gated model; its slots
            must include every scored gate (``<slot fqn>.gate``).
        keep: Fraction of the model's FLOPs (or parameters) to keep, in (0, 1].
        normalize: Per-gate normalisation of the scores first (``"none"``, ``"l2"``, ``"mean"``; as
            `keep_masks`). Scores in loss units (Taylor) compare across gates as they are; weight norms do not.
        round_to: Kept counts are multiples of this (or the whole gate): units close in groups of ``round_to``.
        max_sparsity: Largest fraction of any one gate that may be pruned (None: no limit).
        min_keep: Fewest units kept per multi-unit gate.
        current: ``{gate_fqn: (num_units,) bool keep mask}`` of the scored gates now (None or a missing key:
            all open).
        may_close: Gates that may lose every unit, as in `keep_masks` (None: the gates of a single unit).

    Returns:
        ``{gate_fqn: bool keep mask}`` for the scored gates, for `dynsparse.fix_gates_`.

    Examples:
        >>> import timm, torch, dynsparse as ds
        >>> from dynsparse.flops import CostModel
        >>> from dynsparse.importance import MagnitudeImportance, flops_keep_masks
        >>> m = ds.sparsify_(timm.create_model("test_resnet"), {"channels": "fixed"})
        >>> cm = CostModel(m, torch.randn(1, 3, 32, 32))
        >>> _ = ds.fix_gates_(m, flops_keep_masks(MagnitudeImportance()(m), cm, 0.8, normalize="l2"))
        >>> cm.fraction() <= 0.8
        True
    """
    owner = "flops_keep_masks"
    s = _score_tensors(owner, scores, ndim=1)
    keep = _fraction(owner, "keep", keep)
    if keep is None or keep <= 0:
        raise ConfigError(f"{owner}: keep must be a fraction in (0, 1], got {keep!r}")
    max_sparsity = _fraction(owner, "max_sparsity", max_sparsity)
    _choice(owner, "normalize", normalize, NORMALIZATIONS)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"{owner}: round_to must be an int >= 1, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ConfigError(f"{owner}: min_keep must be an int >= 0, got {min_keep!r}")
    slots = getattr(cost, "slots", None)
    if slots is None or not hasattr(cost, "terms"):
        raise ConfigError(f"{owner}: cost must be a dynsparse.flops.CostModel, got {type(cost).__name__}")
    index = {f"{fqn}.gate": i for i, (fqn, _) in enumerate(slots)}
    missing = [k for k in s if k not in index]
    if missing:
        raise ConfigError(
            f"{owner}: the cost model has no gate {missing[0]!r} (it has: {', '.join(list(index)[:8])}"
            f"{', ...' if len(index) > 8 else ''}); build the CostModel on the model these scores are from"
        )
    cur = _current_masks(owner, s, current)
    norm = _normalized_all(s, normalize, cur)
    for k, v in norm.items():
        v = v[cur[k]]
        if bool((v < 0).any()):
            raise ConfigError(
                f"{owner}: scores for {k!r} are negative (min {float(v.min()):.3g}); a score per FLOP needs "
                "scores >= 0 (use a magnitude-type importance, or rank by score alone with keep_masks)"
            )

    keys = list(s)
    sizes = {k: s[k].numel() for k in keys}
    caps = {}
    for k, n in sizes.items():
        cap = n - (0 if _closable(k, n, may_close) else min(min_keep, n))
        if max_sparsity is not None:
            cap = min(cap, int(max_sparsity * n + 1e-9))
        if round_to > 1:  # the kept count stays a multiple of round_to (or the whole gate)
            cap = n - _ceil_to(n - cap, round_to, n)
        caps[k] = max(cap, 0)
    orders = {k: _prune_order(_closed_first(norm[k], cur[k])) for k in keys}  # closed units first
    # cumulative score of the first j units in prune order, to value a group in O(1) (closed units count 0)
    open_norm = {k: torch.where(cur[k], norm[k], torch.zeros_like(norm[k])) for k in keys}
    cums = {k: torch.cat([norm[k].new_zeros(1), open_norm[k][orders[k]].cumsum(0)]) for k in keys}

    num = len(slots)
    terms = cost.terms
    member = torch.zeros(len(terms), num, dtype=torch.bool)
    weight = torch.zeros(len(terms), dtype=torch.float64)
    for t, (key, c) in enumerate(terms):
        member[t, list(key)] = True
        weight[t] = c
    total = float(cost.total) or 1.0
    with torch.no_grad():
        frac = torch.tensor([float(m.gate.keep_mask().float().mean()) for _, m in slots], dtype=torch.float64)
    pruned = {k: sizes[k] - int(cur[k].sum()) for k in keys}  # the closed units are pruned from the start
    for k in keys:
        frac[index[k]] = 1.0 - pruned[k] / sizes[k]

    def kept_and_marginal() -> tuple[float, Tensor]:
        a = torch.where(member, frac.expand_as(member), torch.ones((), dtype=torch.float64))
        ones = torch.ones(len(terms), 1, dtype=torch.float64)
        before = torch.cat([ones, a.cumprod(1)[:, :-1]], 1)  # product of the factors left of column i
        after = torch.cat([a.flip(1).cumprod(1).flip(1)[:, 1:], ones], 1)  # ... right of column i
        kept = float((weight * a.prod(1)).sum()) / total
        return kept, (weight[:, None] * member * before * after).sum(0) / total  # d kept / d frac_i

    kept, marginal = kept_and_marginal()
    while kept > keep + 1e-12:
        best, best_key, best_size = None, None, 0
        for k in keys:
            done, n = pruned[k], sizes[k]
            if done >= caps[k]:
                continue
            size = _next_group(n - done, round_to)
            size = min(size, caps[k] - done)
            saving = float(marginal[index[k]]) * size / n
            if saving <= 0:
                continue
            value = float(cums[k][done + size] - cums[k][done]) / saving
            if best is None or value < best:
                best, best_key, best_size = value, k, size
        if best_key is None:
            log.warning("%s: kept fraction %.4f, asked %.4f; no gate may close more units", owner, kept, keep)
            break
        pruned[best_key] += best_size
        frac[index[best_key]] = 1.0 - pruned[best_key] / sizes[best_key]
        kept, marginal = kept_and_marginal()
    return _first_pruned(orders, pruned)


def _next_group(kept: int, round_to: int) -> int:
    """Units to close to go from ``kept`` to the next lower multiple of ``round_to`` (the whole gate: ``n % r``)."""
    return kept - (kept - 1) // round_to * round_to


def _ceil_to(kept: int, round_to: int, n: int) -> int:
    """Smallest multiple of ``round_to`` (or ``n``) that is ``>= kept``."""
    up = -(-kept // round_to) * round_to
    return min(up, n)

"""Scores to keep masks: ``keep_masks`` for gates (structured), ``unstructured_masks`` for weights.

Higher score = kept. Ties are broken by position, so the counts are exact and the result is deterministic:
for gate units the lower unit index is kept (as ``dynsparse.gates.functional.topk_mask`` does); for weights the
lower flat index is pruned first (as ``dynsparse.prune.unstructured_`` does, so both give the same masks).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from ..registry import suggest

__all__ = ["NORMALIZATIONS", "keep_masks", "unstructured_masks"]

log = logging.getLogger(__name__)

#: Per-gate normalisations of the scores before a global ranking.
NORMALIZATIONS = ("none", "l2", "mean")
_SCOPES = ("global", "layer")
_WEIGHT_SCOPES = ("global", "layer", "row")


def _count(fraction: float, n: int) -> int:
    """Units pruned out of ``n`` for a sparsity ``fraction``: ``floor(fraction * n + 0.5)`` (as ``prune``)."""
    return min(n, math.floor(fraction * n + 0.5))


def _fraction(owner: str, name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{owner}: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _choice(owner: str, name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"{owner}: unknown {name} {value!r}.{suggest(str(value), choices)} Known: {', '.join(choices)}"
        )
    return value


def _score_tensors(owner: str, scores: Mapping[str, Tensor], ndim: int | None) -> dict[str, Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise ConfigError(f"{owner}: scores must be a non-empty mapping {{fqn: tensor}}, got {type(scores).__name__}")
    out = {}
    for key, s in scores.items():
        t = torch.as_tensor(s).detach().cpu()
        if ndim is not None and t.dim() != ndim:
            raise ConfigError(f"{owner}: scores for {key!r} must be {ndim}-D, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ConfigError(f"{owner}: scores for {key!r} are empty")
        t = t.double()
        if torch.isnan(t).any():
            raise ConfigError(f"{owner}: scores for {key!r} contain NaN")
        out[key] = t
    return out


def _normalized(s: Tensor, how: str, keep: Tensor | None = None) -> Tensor:
    """``s`` divided by its L2 norm (``"l2"``) or mean absolute value (``"mean"``) over the ``keep`` entries."""
    ref = s if keep is None or not bool(keep.any()) else s[keep]
    if how == "l2":
        d = ref.norm()
    elif how == "mean":
        d = ref.abs().mean()
    else:
        return s
    return s / d if bool(d > 0) and bool(torch.isfinite(d)) else s


def _normalized_all(s: Mapping[str, Tensor], how: str, current: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every gate's scores normalised (``how``) over its open units; single-unit gates together, as one group.

    A single-unit gate (a ``layers`` branch gate) divided by its own norm would score ±1 whatever it is worth, so
    the branch gates are normalised as one set: their order among themselves is kept.
    """
    out = {k: _normalized(v, how, current[k]) for k, v in s.items() if v.numel() > 1}
    singles = [k for k, v in s.items() if v.numel() == 1]
    if singles:
        joint = _normalized(torch.cat([s[k] for k in singles]), how, torch.cat([current[k] for k in singles]))
        out.update((k, joint[i : i + 1]) for i, k in enumerate(singles))
    return {k: out[k] for k in s}


def _current_masks(owner: str, s: Mapping[str, Tensor], current: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """The keep mask each scored gate has now (all open where ``current`` has none), checked against the scores."""
    out = {}
    for k, v in s.items():
        m = None if current is None else current.get(k)
        if m is None:
            out[k] = torch.ones(v.numel(), dtype=torch.bool)
            continue
        m = torch.as_tensor(m).detach().cpu()
        if m.dtype != torch.bool or m.shape != v.shape:
            raise ConfigError(
                f"{owner}: current mask for {k!r} must be bool of shape {tuple(v.shape)}, "
                f"got {m.dtype} {tuple(m.shape)}"
            )
        out[k] = m
    return out


def _closed_first(s: Tensor, keep: Tensor) -> Tensor:
    """``s`` with every closed unit (``keep`` False) at -inf: below every open unit, so it is pruned first."""
    return torch.where(keep, s, torch.full_like(s, -math.inf))


def _prune_order(s: Tensor, keep: Tensor | None = None) -> Tensor:
    """Unit indices from first pruned to last: the closed units (``keep`` False) first, then ascending score, ties:
    the higher index first. The closed units go first by a key of their own, not by their score: an open unit
    scored -inf never passes one."""
    n = s.numel()
    order = n - 1 - torch.sort(s.flip(0), stable=True).indices
    return order if keep is None else _closed_to_front(order, keep[order])


def _closed_to_front(order: Tensor, kept: Tensor) -> Tensor:
    """``order`` with the entries whose ``kept`` is False moved to the front, both parts in their order."""
    return order[torch.sort(kept.to(torch.int8), stable=True).indices]


def keep_masks(
    scores: Mapping[str, Tensor],
    sparsity: float | None = None,
    *,
    num_pruned: int | None = None,
    scope: Literal["global", "layer"] = "global",
    normalize: Literal["none", "l2", "mean"] = "none",
    round_to: int = 1,
    max_sparsity: float | None = None,
    min_keep: int = 1,
    current: Mapping[str, Tensor] | None = None,
    may_close: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Turn per-unit scores into ``{gate_fqn: (num_units,) bool keep mask}`` for `dynsparse.fix_gates_`.

    The lowest scores are pruned. How many:

    * ``scope="global"``: ``floor(sparsity · N + 0.5)`` units (or ``num_pruned``) over all ``N`` units of all
      gates, ranked together after the optional per-gate ``normalize`` (``"l2"``: divide by the gate's L2 norm,
      Molchanov 2017; ``"mean"``: by its mean absolute score; the single-unit ``layers`` branch gates are
      normalised together, as one group, since one score divided by its own norm is always 1). Exact unless a
      constraint below blocks it (then as many as allowed are pruned and a warning is logged).
    * ``scope="layer"``: ``floor(sparsity · n_g + 0.5)`` units (or ``num_pruned``) in each gate.

    Constraints per gate, applied in both scopes: at most ``floor(max_sparsity · n_g)`` units pruned; at least
    ``min_keep`` kept (the gates in ``may_close`` are exempt: by default those of a single unit, i.e. ``layers``
    branch gates, which may close); and
    with ``round_to > 1`` the kept count is a multiple of ``round_to`` (or the whole gate), rounded to the
    nearest allowed count (halfway: keep more), so totals are then approximate.

    With ``current`` (the gates' keep masks now, e.g. ``gate.keep_mask()``), a unit closed already ranks below
    every open unit and stays closed (the result is AND-ed with it), even where that exceeds ``max_sparsity`` or
    breaks ``round_to``; it counts towards the pruned units, and normalisation uses the open units only. So
    pruning again after fine-tuning (to a higher sparsity) never re-opens a unit.

    Args:
        scores: ``{gate_fqn: (num_units,) scores}``, e.g. from an `Importance`; higher = keep.
        sparsity: Fraction of units pruned, in [0, 1]. Give exactly one of ``sparsity`` and ``num_pruned``.
        num_pruned: Number of units pruned (in total for ``"global"``, per gate for ``"layer"``).
        scope: ``"global"`` or ``"layer"``.
        normalize: ``"none"``, ``"l2"`` or ``"mean"`` (only matters for ``"global"``).
        round_to: Kept counts are multiples of this (e.g. 8 for SIMD-friendly widths).
        max_sparsity: Largest fraction of any one gate that may be pruned (None: no limit).
        min_keep: Fewest units kept per multi-unit gate.
        current: ``{gate_fqn: (num_units,) bool keep mask}`` of the gates now (None or a missing key: all open).
        may_close: Gates that may lose every unit (``layers`` branch gates); None: the gates of a single unit. A
            one-head attention's ``heads`` gate is a single unit too, but closing it zeroes the attention rather
            than removing it: `dynsparse.prune.structured_` passes only its ``layers`` gates.

    Returns:
        ``{gate_fqn: bool tensor}`` on the CPU, one per key of ``scores``.

    Examples:
        >>> m = keep_masks({"a.gate": torch.tensor([1.0, 2, 3, 4]), "b.gate": torch.tensor([10.0, 20, 30, 40])}, 0.5)
        >>> m["a.gate"].tolist(), m["b.gate"].tolist()
        ([False, False, False, True], [False, True, True, True])
    """
    owner = "keep_masks"
    s = _score_tensors(owner, scores, ndim=1)
    sparsity = _fraction(owner, "sparsity", sparsity)
    max_sparsity = _fraction(owner, "max_sparsity", max_sparsity)
    if (sparsity is None) == (num_pruned is None):
        raise ConfigError(f"{owner}: give exactly one of sparsity and num_pruned")
    if num_pruned is not None and (isinstance(num_pruned, bool) or not isinstance(num_pruned, int) or num_pruned < 0):
        raise ConfigError(f"{owner}: num_pruned must be an int >= 0, got {num_pruned!r}")
    _choice(owner, "scope", scope, _SCOPES)
    _choice(owner, "normalize", normalize, NORMALIZATIONS)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"{owner}: round_to must be an int >= 1, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ConfigError(f"{owner}: min_keep must be an int >= 0, got {min_keep!r}")

    cur = _current_masks(owner, s, current)
    keys = list(s)
    sizes = {k: s[k].numel() for k in keys}
    closed = {k: sizes[k] - int(cur[k].sum()) for k in keys}
    caps = {}  # most units of each gate that may be pruned
    for k, n in sizes.items():
        cap = n - (0 if _closable(k, n, may_close) else min(min_keep, n))
        if max_sparsity is not None:
            cap = min(cap, math.floor(max_sparsity * n + 1e-9))
        caps[k] = max(cap, 0)
    orders = {k: _prune_order(s[k], cur[k]) for k in keys}  # closed units first

    if scope == "layer":
        want = {k: (num_pruned if num_pruned is not None else _count(sparsity, n)) for k, n in sizes.items()}
        pruned = {k: min(want[k], caps[k], sizes[k]) for k in keys}
        requested = sum(min(w, sizes[k]) for k, w in want.items())
    else:
        total = sum(sizes.values())
        requested = min(num_pruned, total) if num_pruned is not None else _count(sparsity, total)
        # every unit in global prune order: ascending normalised score, ties by gate order then unit order
        norm = _normalized_all(s, normalize, cur)
        values, opens, gate_of, rank = [], [], [], []
        for gi, k in enumerate(keys):
            order = orders[k]
            values.append(_closed_first(norm[k], cur[k])[order])
            opens.append(cur[k][order])
            gate_of.append(torch.full((len(order),), gi, dtype=torch.long))
            rank.append(torch.arange(len(order)))
        values_t, gate_t, rank_t = torch.cat(values), torch.cat(gate_of), torch.cat(rank)
        glob = torch.sort(values_t, stable=True).indices
        glob = _closed_to_front(glob, torch.cat(opens)[glob])  # every closed unit first, whatever the scores
        cap_t = torch.tensor([caps[k] for k in keys], dtype=torch.long)
        closed_t = torch.tensor([closed[k] for k in keys], dtype=torch.long)
        # a unit may go only while its gate is under its cap; a closed unit (first in its order) always counts
        allowed = glob[(rank_t[glob] < cap_t[gate_t[glob]]) | (rank_t[glob] < closed_t[gate_t[glob]])]
        chosen = gate_t[allowed[:requested]]
        counts = torch.bincount(chosen, minlength=len(keys))
        pruned = {k: int(counts[gi]) for gi, k in enumerate(keys)}

    if round_to > 1:
        for k in keys:
            pruned[k] = sizes[k] - _round_kept(sizes[k] - pruned[k], sizes[k], sizes[k] - caps[k], round_to)
    pruned = {k: max(p, closed[k]) for k, p in pruned.items()}  # a closed unit stays closed
    done = sum(pruned.values())
    if round_to == 1 and done < requested:
        log.warning(
            "keep_masks: pruned %d of the %d units asked; max_sparsity / min_keep allow no more", done, requested
        )
    return _first_pruned(orders, pruned)


def _first_pruned(orders: Mapping[str, Tensor], pruned: Mapping[str, int]) -> dict[str, Tensor]:
    """Keep masks with the first ``pruned[k]`` units of each prune order ``orders[k]`` closed."""
    out = {}
    for k, order in orders.items():
        mask = torch.ones(order.numel(), dtype=torch.bool)
        mask[order[: pruned[k]]] = False
        out[k] = mask
    return out


def _round_kept(kept: int, n: int, lowest: int, round_to: int) -> int:
    """The allowed kept count nearest to ``kept``: a multiple of ``round_to`` or ``n``, and ``>= lowest``."""
    allowed = [c for c in range(0, n + 1, round_to) if c >= lowest] + [n]
    return min(allowed, key=lambda c: (abs(c - kept), -c))


def _lowest_mask(flat: Tensor, k: int) -> Tensor:
    """Bool mask of exactly ``k`` lowest entries of 1-D ``flat`` (ties: lowest index first), on ``flat``'s device."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    thr = flat.kthvalue(k).values
    out = flat < thr
    missing = k - int(out.sum())
    if missing > 0:
        out[(flat == thr).nonzero().squeeze(1)[:missing]] = True
    return out


def unstructured_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    scope: Literal["global", "layer", "row"] = "global",
    exclude: str | Sequence[str] = (),
) -> dict[str, Tensor]:
    """Turn per-weight scores into ``{param_fqn: bool keep mask}`` with exactly the requested sparsity.

    ``"global"`` prunes ``floor(sparsity · N + 0.5)`` of all ``N`` scored weights together (SNIP, GraSP,
    SynFlow); ``"layer"`` that fraction of each tensor (AGP, Han 2015); ``"row"`` that fraction of each output
    row (``w[i]``, Wanda). The lowest scores go; ties are broken by position (lower flat index pruned first, the
    keys in their order), so counts are exact. The masks feed ``dynsparse.prune.apply_masks_``.

    Args:
        scores: ``{param_fqn: scores shaped like the weight}``; higher = keep.
        sparsity: Fraction pruned, in [0, 1].
        scope: ``"global"``, ``"layer"`` or ``"row"``.
        exclude: Glob patterns of ``param_fqn`` keys left out of the ranking and of the result.

    Examples:
        >>> unstructured_masks({"w": torch.tensor([[3.0, 1.0], [2.0, 4.0]])}, 0.5)["w"].tolist()
        [[True, False], [False, True]]
    """
    owner = "unstructured_masks"
    pats = [exclude] if isinstance(exclude, str) else list(exclude)
    kept = {k: v for k, v in scores.items() if not any(fnmatch.fnmatchcase(k, p) for p in pats)}
    if not kept:
        raise ConfigError(f"{owner}: no scores left after exclude={exclude!r}")
    s = _score_tensors(owner, kept, ndim=None)
    sparsity = _fraction(owner, "sparsity", sparsity)
    _choice(owner, "scope", scope, _WEIGHT_SCOPES)
    if scope == "global":
        flat = torch.cat([t.flatten() for t in s.values()])
        prune = _lowest_mask(flat, _count(sparsity, flat.numel()))
        out, start = {}, 0
        for k, t in s.items():
            out[k] = ~prune[start : start + t.numel()].view(t.shape)
            start += t.numel()
        return out
    if scope == "layer":
        return {k: ~_lowest_mask(t.flatten(), _count(sparsity, t.numel())).view(t.shape) for k, t in s.items()}
    out = {}
    for k, t in s.items():
        rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        n_prune = _count(sparsity, rows.shape[1])
        order = torch.sort(rows, dim=1, stable=True).indices[:, :n_prune]
        mask = torch.ones_like(rows, dtype=torch.bool)
        mask.scatter_(1, order, False)
        out[k] = mask.view(t.shape)
    return out


def _closable(key: str, n: int, may_close: Collection[str] | None) -> bool:
    """Whether gate ``key`` (of ``n`` units) may lose all of them: in ``may_close``, or (None) a single-unit gate."""
    return n == 1 if may_close is None else key in may_close

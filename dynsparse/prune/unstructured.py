"""Unstructured (per-weight) pruning with masks: ``unstructured_``, ``apply_masks_``, ``remove_`` and the reports.

A pruned layer is a `MaskedLinear` / `MaskedConv2d` (defined in `dynsparse.prune.masked`, re-exported here): the
host class with the same ``weight`` and ``bias`` and one new bool buffer ``weight_mask``, so a pruned model's state
dict holds the host keys plus ``*.weight_mask``. The forward multiplies the weight by the mask, so a masked weight
has no effect on the output and gets a zero gradient. An optimizer with state (momentum, Adam) still moves the raw
masked weights: `reapply_masks_on_step` sets them back to 0 after every ``optimizer.step()``. ``remove_`` makes the
pruning permanent and gives back plain ``nn.Linear`` / ``nn.Conv2d``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError, DynsparseError, UnsupportedModuleError
from ..importance._util import gate_layers
from ..importance.masks import _count
from ..importance.masks import _lowest_mask as _lowest
from ..modules import replace_module_
from ..registry import suggest
from ..sparsify import _patterns, _selected
from .masked import _MASKED, TWINS, MaskedConv2d, MaskedLinear, _masked_modules, _to_host, _zero_masked_

__all__ = [
    "IMPORTANCES",
    "SCOPES",
    "MaskedConv2d",
    "MaskedLinear",
    "Sparsity",
    "apply_masks_",
    "masks",
    "reapply_masks_",
    "reapply_masks_on_step",
    "remove_",
    "sparsity",
    "unstructured_",
]

log = logging.getLogger(__name__)

#: Importance criteria ``unstructured_`` computes itself (anything else is passed as ``{param_fqn: scores}``).
IMPORTANCES = ("magnitude",)
#: Where the sparsity is enforced: over all selected weights at once, or in each layer.
SCOPES = ("global", "layer", "row")


def _check_fraction(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_layers(layers: Sequence[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    if isinstance(layers, type):
        layers = (layers,)
    layers = tuple(layers)
    for cls in layers:
        if cls not in TWINS:
            known = ", ".join(f"nn.{c.__name__}" for c in TWINS)
            raise ConfigError(f"layers: no masked twin for {getattr(cls, '__name__', cls)!r}; supported: {known}")
    if not layers:
        raise ConfigError("layers must name at least one layer class")
    return layers


def _targets(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    layers: tuple[type[nn.Module], ...],
) -> list[tuple[str, list[str], nn.Module]]:
    """``(fqn, all_fqns, module)`` of every selected prunable module, each module once (shared ones too)."""
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    in_gates = gate_layers(model)  # a gate's own layers decide, they are not the model: never pruned
    found: dict[int, tuple[str, list[str], nn.Module]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if id(module) in in_gates:
            continue
        kind = type(module).host if isinstance(module, _MASKED) else type(module)
        if kind not in layers or type(module) not in (kind, TWINS[kind]):
            continue
        found.setdefault(id(module), (fqn, [], module))[1].append(fqn)
    where = {k: t for k, t in found.items() if _selected(t[0], inc, exc)}
    owners: dict[int, str] = {}
    for fqn, _, module in where.values():
        other = owners.setdefault(id(module.weight), fqn)
        if other != fqn:
            raise ConfigError(
                f"{fqn!r} and {other!r} share one weight tensor; tied weights cannot carry two masks "
                "(exclude one of them)"
            )
    return list(where.values())


def _old_mask(module: nn.Module) -> Tensor:
    if isinstance(module, _MASKED):
        return module.weight_mask.detach().ne(0)
    return torch.ones(module.weight.shape, dtype=torch.bool, device=module.weight.device)


def _scores(
    model: nn.Module, targets: list[tuple[str, list[str], nn.Module]], importance: str | Mapping[str, Tensor]
) -> dict[str, Tensor]:
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            raise ConfigError(
                f"unknown importance {importance!r}.{suggest(importance, IMPORTANCES)} Known: {', '.join(IMPORTANCES)}"
                " (or pass {param_fqn: scores})"
            )
        return {fqn: module.weight.detach().abs() for fqn, _, module in targets}
    if not isinstance(importance, Mapping):
        raise ConfigError(
            f"importance must be one of {IMPORTANCES} or a mapping {{param_fqn: scores}}, "
            f"got {type(importance).__name__}"
        )
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for key in importance:
        if key not in params:
            raise ConfigError(f"importance: {key!r} names no parameter of the model.{suggest(key, list(params))}")
    out = {}
    for fqn, _, module in targets:
        key = f"{fqn}.weight"
        if key not in importance:
            raise ConfigError(f"importance: no scores for {key!r} ({type(module).__name__}), which is selected")
        s = torch.as_tensor(importance[key]).detach()
        if s.shape != module.weight.shape:
            raise ConfigError(
                f"importance: scores for {key!r} have shape {tuple(s.shape)}, the weight {tuple(module.weight.shape)}"
            )
        if not s.is_floating_point():
            s = s.double()
        if torch.isnan(s).any():
            raise ConfigError(f"importance: scores for {key!r} contain NaN")
        out[fqn] = s.to(module.weight.device)
    return out


def _score_dtype(scores: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(s.dtype == torch.float64 for s in scores) else torch.float32


def _new_masks(
    targets: list[tuple[str, list[str], nn.Module]],
    olds: dict[str, Tensor],
    scores: dict[str, Tensor],
    sparsity: float,
    scope: str,
) -> dict[str, Tensor]:
    if scope == "row":
        return {fqn: _row_mask(olds[fqn], scores[fqn], sparsity) for fqn, _, _ in targets}
    groups = [[fqn for fqn, _, _ in targets]] if scope == "global" else [[fqn] for fqn, _, _ in targets]
    new = {}
    for group in groups:
        total = sum(olds[f].numel() for f in group)
        dead = sum(int((~olds[f]).sum()) for f in group)
        need = _count(sparsity, total) - dead
        if need < 0:
            where = "in total" if scope == "global" else f"in {group[0]!r}"
            log.warning(
                "unstructured_: %.4f of the weights %s are already pruned, more than the %.4f asked; "
                "pruned weights stay pruned",
                dead / total,
                where,
                sparsity,
            )
        dtype = _score_dtype([scores[f] for f in group])
        device = olds[group[0]].device
        alive = torch.cat([scores[f][olds[f]].to(dtype=dtype, device=device) for f in group])
        prune = _lowest(alive, need)
        start = 0
        for f in group:
            mask = olds[f].clone()
            n_alive = int(mask.sum())
            mask[olds[f]] = ~prune[start : start + n_alive].to(mask.device)
            start += n_alive
            new[f] = mask
    return new


def _row_mask(old: Tensor, scores: Tensor, sparsity: float) -> Tensor:
    """``old`` with, in every output row (the weight as (out, -1)), the lowest-scored live weights pruned until the row
    has ``_count(sparsity, row length)`` pruned (more when it had more already: they stay pruned); ties by position."""
    rows = old.reshape(old.shape[0], -1)
    s = scores.reshape(rows.shape).to(dtype=_score_dtype([scores]), device=rows.device)
    order = torch.sort(s, dim=1, stable=True).indices
    # the pruned ones first (they stay pruned), before any live one, even one scored -inf
    order = order.gather(1, torch.sort(rows.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    dead = (~rows).sum(1, keepdim=True)
    need = torch.clamp(dead, min=_count(sparsity, rows.shape[1]))
    return (rows & (rank >= need)).reshape(old.shape)


def unstructured_(
    model: nn.Module,
    sparsity: float,
    *,
    importance: str | Mapping[str, Tensor] = "magnitude",
    scope: Literal["global", "layer", "row"] = "global",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layers: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv2d),
) -> nn.Module:
    """Prune individual weights of ``model`` in place, to exactly ``sparsity`` of the selected weights, and return it.

    Selected layers (exact types in ``layers``, matched by ``include`` / ``exclude``) are swapped for their masked
    twins (`MaskedLinear`, `MaskedConv2d`; same parameters, hooks and training flag), or their masks are updated
    if they are masked already. Pruning never revives a weight: the new mask is the old one AND-ed with the
    fresh selection, and the count is taken over all selected weights, pruned ones included, so repeated calls
    with growing ``sparsity`` reach ``round(sparsity * n)`` pruned weights exactly (``n`` = all selected weights
    for ``scope="global"``, each layer's weights for ``scope="layer"``, each output row's for ``scope="row"``). A
    ``sparsity`` below what is already
    pruned changes nothing (logged as a warning). Newly pruned raw weights are set to 0 as well. Ties in the
    scores are broken by position, so the count is always exact. Biases are never pruned.

    ``sparsity=0.0`` only swaps in all-True masks: the way to prepare a dense model for loading a pruned
    checkpoint (its ``*.weight_mask`` keys).

    Args:
        model: Any module; the root itself cannot be swapped (wrap a bare layer in ``nn.Sequential``).
        sparsity: Fraction of the selected weights pruned after the call, in [0, 1].
        importance: ``"magnitude"`` (|w| of the current weights) or ``{param_fqn: scores}`` with one score per
            weight (e.g. ``{"blocks.0.mlp.fc1.weight": (3072, 768) tensor}``), higher = more important; needed
            for every selected layer; keys for other parameters are ignored.
        scope: ``"global"`` ranks all selected weights together (layers end up with different sparsities);
            ``"layer"`` prunes each layer to ``sparsity``; ``"row"`` each output row of each weight (a Linear's row,
            a conv's filter), as Wanda compares its scores (Sun et al. 2024: per output).
        include: fqn glob patterns of the modules to prune (default: all of the right types, except the layers of
            gates: per-input predictors, routers and saliency networks are never pruned).
        exclude: fqn glob patterns of modules left alone (e.g. ``"head"``).
        layers: Host classes to prune, matched by exact type (subclasses such as
            ``NonDynamicallyQuantizableLinear`` are left alone); each needs a masked twin.

    Returns:
        ``model``, with masked layers.

    Raises:
        ConfigError: bad ``sparsity`` / ``scope`` / ``importance`` / ``layers``, scores with a wrong shape or NaN
            (names the parameter fqn), tied weights, or no layer selected.
        UnsupportedModuleError: the root module itself would need swapping.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> _ = unstructured_(model, 0.5)
        >>> sparsity(model).overall
        0.5
        >>> _ = unstructured_(model, 0.75, scope="layer")
        >>> sparsity(model).layers
        {'0.weight': 0.75, '2.weight': 0.75}
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}.{suggest(str(scope), SCOPES)} Known: {', '.join(SCOPES)}")
    layers = _check_layers(layers)
    targets = _targets(model, include, exclude, layers)
    if not targets:
        names = ", ".join(c.__name__ for c in layers)
        raise ConfigError(f"unstructured_: no module of type {names} matches include={include!r}, exclude={exclude!r}")
    olds = {fqn: _old_mask(module) for fqn, _, module in targets}
    scores = _scores(model, targets, importance)
    new = _new_masks(targets, olds, scores, sparsity, scope)
    _install_(model, targets, new)
    return model


def _install_(model: nn.Module, targets: list[tuple[str, list[str], nn.Module]], new: Mapping[str, Tensor]) -> None:
    """Swap each target for its masked twin (unless masked already) and set its mask; zero the pruned weights."""
    for fqn, fqns, module in targets:
        if not isinstance(module, _MASKED):
            if "" in fqns:
                raise UnsupportedModuleError(
                    "", type(module).__name__, "weights", "the root module cannot be swapped in place; wrap it", "prune"
                )
            masked = TWINS[type(module)].from_module(module)
            for name in fqns:
                replace_module_(model, name, masked)
            module = masked
        mask = new[fqn].to(module.weight_mask.device)
        with torch.no_grad():
            if module.weight_mask.dtype == torch.bool:
                module.weight_mask.copy_(mask)
            else:
                module.weight_mask.mul_(mask)
        _zero_masked_(module)


def apply_masks_(model: nn.Module, keep_masks: Mapping[str, Tensor]) -> nn.Module:
    """Apply given keep masks in place (e.g. from `block_mask` / `nm_mask`) and return ``model``.

    Each ``{param_fqn: bool keep mask}`` entry names the ``weight`` of an ``nn.Linear`` / ``nn.Conv2d`` (exact
    type) or of a masked twin; the layer is swapped for its twin if needed and its mask AND-ed with the given
    one (never reviving a weight); newly masked raw weights are set to 0.

    Raises:
        ConfigError: a key names no prunable weight (with close matches), or a mask has the wrong shape.
    """
    found = {f"{fqn}.weight": t for t in _targets(model, None, None, tuple(TWINS)) for fqn in t[1]}
    targets, new = [], {}
    for key, mask in keep_masks.items():
        if key not in found:
            raise ConfigError(f"apply_masks_: {key!r} names no prunable weight.{suggest(key, list(found))}")
        fqn, fqns, module = found[key]
        m = torch.as_tensor(mask, device=module.weight.device).ne(0)
        if m.shape != module.weight.shape:
            raise ConfigError(
                f"apply_masks_: mask for {key!r} has shape {tuple(m.shape)}, the weight {tuple(module.weight.shape)}"
            )
        if fqn not in new:
            targets.append((fqn, fqns, module))
            new[fqn] = _old_mask(module)
        new[fqn] = new[fqn] & m
    _install_(model, targets, new)
    return model


def remove_(model: nn.Module) -> nn.Module:
    """Make the pruning permanent in place and return ``model``.

    Every masked layer becomes a plain ``nn.Linear`` / ``nn.Conv2d`` sharing the same parameter objects (so an
    optimizer holding them stays valid), with its masked weights set to 0; the ``*.weight_mask`` keys go away.
    The output is unchanged.

    Raises:
        DynsparseError: ``model`` itself is a masked layer (it cannot be swapped in place).
    """
    if isinstance(model, _MASKED):
        raise DynsparseError(f"remove_: the root module is a {type(model).__name__}; wrap it to swap it back")
    swaps = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, _MASKED):
            if id(module) not in swaps:
                _zero_masked_(module)
                swaps[id(module)] = _to_host(module)
            replace_module_(model, fqn, swaps[id(module)])
    return model


def reapply_masks_(model: nn.Module) -> nn.Module:
    """Set every masked raw weight to 0 in place and return ``model``.

    The forward already ignores masked weights; this keeps the raw ``weight`` sparse too, e.g. after an optimizer
    step whose momentum or weight decay moved them.
    """
    for _, module in _masked_modules(model):
        _zero_masked_(module)
    return model


def reapply_masks_on_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Keep ``model``'s masked raw weights at 0 through training: `reapply_masks_` after every ``optimizer.step()``.

    A masked weight gets a zero gradient, but momentum, Adam's moments or decoupled weight decay still move the raw
    ``weight`` under the mask; the forward ignores it, anything reading ``weight`` (a checkpoint, magnitude
    scores, ``remove_`` done later by hand) does not. One line in a custom training loop, through PyTorch's
    ``optimizer.register_step_post_hook``; layers masked later (a schedule) are covered too. Returns the handle:
    ``handle.remove()`` detaches it.

    Examples:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> handle = reapply_masks_on_step(opt, unstructured_(model, 0.5))
        >>> handle.remove()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"reapply_masks_on_step: optimizer must be a torch.optim.Optimizer, got {optimizer!r}")

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        reapply_masks_(model)

    return optimizer.register_step_post_hook(hook)


def masks(model: nn.Module) -> dict[str, Tensor]:
    """``{param_fqn: keep mask}`` (bool copies) of every masked layer, e.g. ``{"0.weight": (16, 8) tensor}``."""
    return {f"{fqn}.weight": module.weight_mask.detach().ne(0).clone() for fqn, module in _masked_modules(model)}


@dataclass(frozen=True)
class Sparsity:
    """Result of `sparsity`: fractions of masked weights.

    Attributes:
        overall: Pruned / total over every masked layer (0.0 when there is none).
        layers: ``{param_fqn: fraction pruned}`` per masked layer.
        pruned: Number of masked weights.
        total: Number of weights of the masked layers.
    """

    overall: float
    layers: dict[str, float] = field(default_factory=dict)
    pruned: int = 0
    total: int = 0


def sparsity(model: nn.Module) -> Sparsity:
    """Fraction of weights masked out, overall and per layer, over the masked layers of ``model``."""
    layers, pruned, total = {}, 0, 0
    for fqn, module in _masked_modules(model):
        n = module.weight_mask.numel()
        p = n - int(module.weight_mask.count_nonzero())
        layers[f"{fqn}.weight"] = p / n if n else 0.0
        pruned += p
        total += n
    return Sparsity(pruned / total if total else 0.0, layers, pruned, total)

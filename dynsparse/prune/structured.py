"""``structured_``: score units, keep the best, freeze the decision into gates (then ``ds.convert`` acts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import nn

from ..errors import ConfigError

__all__ = ["open_gates_", "structured_"]


def structured_(
    model: nn.Module,
    sparsity: Mapping[str, float],
    *,
    importance: Any = "magnitude",
    data: Iterable[Any] | None = None,
    scope: Literal["global", "layer"] = "layer",
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

    Args:
        model: A timm model (gated or not).
        sparsity: ``{"channels": 0.5, "heads": 0.25, ...}``, fraction of each dimension's units removed.
        importance: How to score units (``"magnitude"``, ``"taylor"``, ``"activation"``, ``"apoz"``, ...).
        data: Batches ``(x, y)`` for data-driven scores (Taylor, activations).
        scope: Rank within each gate (``"layer"``) or across all gates of the dimension (``"global"``).
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
    from ..importance import keep_masks, make_importance
    from ..layers.slot import GateSlot
    from ..sparsify import fix_gates_

    if not isinstance(sparsity, Mapping) or not sparsity:
        raise ConfigError(f"structured_: sparsity must be a mapping like {{'channels': 0.5}}, got {sparsity!r}")
    for dim, s in sparsity.items():
        if not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"structured_: sparsity[{dim!r}] must be a fraction in [0, 1), got {s!r}")
    open_gates_(model, list(sparsity), include=include, exclude=exclude)
    slots = {fqn: m for fqn, m in model.named_modules() if isinstance(m, GateSlot)}
    scorer = make_importance(importance)
    scores = scorer(model, data)
    masks = {}
    for dim, s in sparsity.items():
        mine = {f: v for f, v in scores.items() if slots[f.rpartition(".")[0]].dimension == dim}
        if not mine:
            raise ConfigError(f"structured_: the importance {type(scorer).__name__} gave no scores for {dim!r}")
        if s > 0:
            masks.update(
                keep_masks(mine, s, scope=scope, normalize=normalize, round_to=round_to, max_sparsity=max_sparsity)
            )
    return fix_gates_(model, masks) if masks else model


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

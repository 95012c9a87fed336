"""The run-time knob: change how much input-dependent gates keep, without retraining.

`set_budget_` sets ``keep`` of every input-dependent gate of a model (token gates, per-input channel gates,
...); `budget` does it for a ``with`` block and restores the previous values afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .errors import ConfigError, GateError
from .gates import InputDependentGate
from .registry import suggest

__all__ = ["budget", "get_budget", "set_budget_"]


def _gates(model: nn.Module, kind: type | tuple[type, ...] | None) -> list[tuple[str, InputDependentGate]]:
    gates = [(f, m) for f, m in model.named_modules() if isinstance(m, InputDependentGate)]
    if kind is not None:
        gates = [(f, m) for f, m in gates if isinstance(m, kind)]
    if not gates:
        raise ConfigError(f"set_budget_: {type(model).__name__} has no input-dependent gate to set a budget on")
    return gates


def get_budget(model: nn.Module) -> dict[str, float | None]:
    """``{gate_fqn: keep}`` of every input-dependent gate (``None``: a gate on its learned thresholds)."""
    return {f: g.keep for f, g in _gates(model, None)}


def set_budget_(
    model: nn.Module,
    keep: float | dict[str, float | None] | None,
    *,
    kind: type | tuple[type, ...] | None = None,
) -> nn.Module:
    """Set the fraction kept by input-dependent gates (in place); returns ``model``.

    Args:
        model: A model with input-dependent gates.
        keep: One fraction in (0, 1] for every gate, or ``{gate_fqn: keep}``. ``None`` returns gates with learned
            thresholds (the ``threshold`` token gate) to those thresholds instead of a calibrated keep fraction.
        kind: Only gates of this class (e.g. ``dynsparse.gates.TokenGate``).

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = ds.sparsify_(timm.create_model("test_vit"), {"tokens": {"gate": "cls_attention", "blocks": [1]}})
        >>> ds.get_budget(ds.set_budget_(m, keep=0.25))
        {'blocks.1.tokens.gate': 0.25}
    """
    gates = _gates(model, kind)
    if isinstance(keep, dict):
        known = {f for f, _ in gates}
        unknown = sorted(set(keep) - known, key=str)  # by text: an int key beside str keys raised TypeError
        if unknown:
            raise ConfigError(_unknown_message(model, unknown[0], known, kind))
        _apply(gates, keep)
        return model
    _apply(gates, {f: keep for f, _ in gates})
    return model


def _unknown_message(model: nn.Module, name: object, known: set[str], kind: type | tuple[type, ...] | None) -> str:
    """Why ``name`` is not a gate to set: a gate of another class than ``kind``, or no gate (with close names)."""
    every = dict(_gates(model, None))
    if kind is not None and name in every:
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        return f"set_budget_: gate {name!r} is a {type(every[name]).__name__}; kind= selects {kinds} gates only"
    return (
        f"set_budget_: no input-dependent gate named {name!r}.{suggest(str(name), known)} "
        f"Gates: {sorted(known)[:5]}{f' ({len(known)} in all)' if len(known) > 5 else ''}"
    )


def _apply(gates: list[tuple[str, InputDependentGate]], keep: dict[str, float | None]) -> None:
    """Set ``keep[f]`` on each named gate; all or nothing: a refused value restores the gates already set."""
    before = [(f, g, g.keep) for f, g in gates if f in keep]
    for i, (f, g, _) in enumerate(before):
        try:
            g.set_budget_(keep[f])
        except (ConfigError, GateError) as e:
            for _, done, old in before[:i]:
                done.set_budget_(old)
            raise type(e)(f"set_budget_: gate {f!r}: {e}") from e


@contextmanager
def budget(model: nn.Module, keep: float | dict[str, float | None] | None, **kwargs) -> Iterator[nn.Module]:
    """``with budget(model, 0.5): ...`` runs the block at that budget, then restores the previous one."""
    before = get_budget(model)
    set_budget_(model, keep, **kwargs)
    try:
        yield model
    finally:
        set_budget_(model, before)

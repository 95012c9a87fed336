"""Sensitivity analysis: prune one layer (or one gate) at a time at increasing ratios and evaluate, no retraining."""

from __future__ import annotations

import copy
import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..importance.masks import _count
from ..registry import suggest

__all__ = ["SensitivityResult", "sensitivity"]


@dataclass
class SensitivityResult:
    """``curves[name][i]`` is the metric with ``name`` pruned at ``ratios[i]`` (``name`` = weight or gate fqn)."""

    ratios: list[float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    group: str = "element"

    def table(self) -> str:
        """A markdown table, one row per layer."""
        head = "| layer | " + " | ".join(f"{r:.0%}" for r in self.ratios) + " |"
        sep = "|---|" + "---:|" * len(self.ratios)
        rows = [f"| {n} | " + " | ".join(f"{v:.4f}" for v in vals) + " |" for n, vals in self.curves.items()]
        return "\n".join([head, sep, *rows])

    def plot(self, path: str | Path, title: str = "sensitivity", ylabel: str = "metric") -> Path:
        """Write a PNG with one curve per layer (``ylabel``: what ``eval_fn`` measured)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, vals in self.curves.items():
            ax.plot([100 * r for r in self.ratios], vals, marker="o", ms=3, label=name)
        ax.set_xlabel(f"pruned ({self.group}) %")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def ratios_for(self, min_metric: float) -> dict[str, float]:
        """Per layer, the largest ratio whose metric is still ≥ ``min_metric`` (0 when none is)."""
        out = {}
        for name, vals in self.curves.items():
            ok = [r for r, v in zip(self.ratios, vals, strict=True) if v >= min_metric]
            out[name] = max(ok) if ok else 0.0
        return out


def sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    group: Literal["element", "units"] = "element",
    layers: Sequence[str] | None = None,
) -> SensitivityResult:
    """Prune only one layer at a time and evaluate (Han et al. 2015; Distiller's sensitivity analysis).

    Args:
        model: The model (not changed: every evaluation runs on a deep copy).
        eval_fn: ``eval_fn(model) -> float`` (e.g. test accuracy).
        ratios: Fractions pruned.
        group: ``"element"``: magnitude-prune the weight of each Linear/Conv layer alone (not the layers of gates,
            which `unstructured_` never prunes); ``"units"``: close the lowest-magnitude units of each gate alone
            (the model must be gated, e.g. by ``sparsify_``).
        layers: Names to analyse (weight fqns for ``element``, gate fqns for ``units``); default all.

    With ``group="element"`` a layer pruned already (a `MaskedLinear` / `MaskedConv2d`) is analysed too, as
    `unstructured_` prunes it: a ratio is the fraction of all its weights, the pruned ones included, so ratios up
    to its current sparsity give the reference's metric.

    With ``group="units"`` every evaluation, the unpruned reference (ratio 0) included, runs the model with each
    static gate frozen to what it does now in eval mode (`dynsparse.fix_gates_` without masks: its current
    ``keep_mask()`` and eval multipliers), so a learned gate (hard-concrete, sigmoid, ...) is measured as it is
    and two evaluations differ only in the units pruned. A ratio is the fraction of all the gate's units closed:
    units the gate closes already rank lowest and stay closed, so ratios up to the gate's current sparsity
    give the reference's metric (as `structured_` would leave such a gate).

    Returns:
        A `SensitivityResult` (``.table()``, ``.plot(path)``, ``.ratios_for(min_metric)``).
    """
    from .unstructured import unstructured_

    ratios = [float(r) for r in ratios]
    if any(not 0.0 <= r < 1.0 for r in ratios):
        raise ConfigError(f"sensitivity: ratios must be in [0, 1), got {ratios}")
    result = SensitivityResult(ratios=ratios, group=group)
    names = analysable(model, group, layers)
    if not names:
        raise ConfigError(f"sensitivity: nothing to analyse for group {group!r}")
    if group == "units":
        from ..importance import MagnitudeImportance

        scores = MagnitudeImportance()(model)
    for name in names:
        curve = []
        for r in ratios:
            if group == "element":
                m = copy.deepcopy(model)
                fqn = name.rpartition(".")[0]
                if _count(r, m.get_submodule(fqn).weight.numel()) > _pruned(m.get_submodule(fqn)):
                    unstructured_(m, r, scope="layer", include=glob.escape(fqn))
            else:
                m = _units_pruned(model, name, scores[name], r)
            with torch.no_grad():
                curve.append(float(eval_fn(m)))
        result.curves[name] = curve
    return result


def _pruned(module: nn.Module) -> int:
    """Weights of ``module`` masked already (0 for a plain layer)."""
    mask = getattr(module, "weight_mask", None)
    return 0 if mask is None else mask.numel() - int(mask.count_nonzero())


def _units_pruned(model: nn.Module, name: str, score: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model``, every static gate frozen as it is now, with ``ratio`` of gate ``name``'s units closed.

    The gate's closed units rank lowest and stay closed; its kept units keep their eval multipliers.
    """
    from ..gate_ops import fix_gates_
    from ..importance import keep_masks

    m = fix_gates_(copy.deepcopy(model))
    if ratio > 0:
        gate = m.get_submodule(name)
        keep = keep_masks({name: score}, ratio, scope="layer", current={name: gate.keep_mask().cpu()})[name]
        with torch.no_grad():
            gate.mask &= keep.to(gate.mask.device)
    return m


def analysable(model: nn.Module, group: str, layers: Sequence[str] | None = None) -> list[str]:
    """The names `sensitivity` analyses in ``model`` for ``group``: weight fqns (``"element"``: every Linear / Conv
    weight, masked twins included, not the layers of gates) or gate fqns (``"units"``: static gates of more than
    one unit); ``layers`` (checked against them) when given.

    Raises:
        ConfigError: an unknown ``group``, or a name of ``layers`` that is not among them (with close matches).
    """
    from ..gate_ops import named_gates
    from ..importance import MagnitudeImportance
    from ..importance._util import gate_layers
    from .unstructured import _MASKED

    if group == "element":  # masked twins too: a pruned layer is analysed from the sparsity it has
        prunable, in_gates = (nn.Linear, nn.Conv2d, *_MASKED), gate_layers(model)
        names = [f"{n}.weight" for n, m in model.named_modules() if type(m) in prunable and id(m) not in in_gates]
    elif group == "units":
        names = [f for f, g in named_gates(model) if g.num_units > 1]
        scores = MagnitudeImportance()(model) if names else {}
        names = [f for f in names if f in scores]  # static gates of the scored dimensions
    else:
        raise ConfigError(f"sensitivity: group must be 'element' or 'units', got {group!r}")
    if layers is None:
        return names
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ConfigError(
            f"sensitivity: unknown layer {unknown[0]!r} for group {group!r}.{suggest(unknown[0], names)} "
            f"Known: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
        )
    return list(layers)

"""Per-unit importance from forward passes only: activation mean / APoZ, and the loss increase of a closed branch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.slot import GateSlot
from ..regularizers._common import UNIT_DIMENSIONS, SlotRef
from ..sparsify import DIMENSIONS
from ._util import LossFn, batch_loss, batches, check_dimensions, scoring_mode, split_batch, to_model
from .structured import Importance

__all__ = ["ActivationImportance", "LayerImportance"]

_KINDS = ("mean", "apoz")


def _unit_view(slot: GateSlot, a: Tensor) -> Tensor:
    """``(M, num_units, k)`` view of the activations ``a`` a slot multiplies, unit ``j`` in ``[:, j]``."""
    n = slot.gate.num_units
    if slot.unit_size == 0:  # a branch gate: the whole tensor is one unit
        return a.reshape(1, 1, -1)
    return a.movedim(slot.dim % a.ndim, -1).reshape(-1, n, slot.unit_size)


class ActivationImportance(Importance):
    """Activation statistics of each unit at its gate, over calibration batches (methods.md 2.21).

    Forward hooks on the gate slots see exactly the unit activations the gate multiplies (after the activation
    the slot may hold, e.g. a ResNet block's ReLU in ``act1``; before the gate), laid out
    ``(..., num_units * unit_size)`` on ``slot.dim``. The hooks are removed afterwards; the model runs in eval
    mode under ``no_grad`` and its flags and buffers are restored.

    * ``kind="mean"``: ``Θ_j = mean |a|`` over the unit's elements, samples and positions (the mean post-ReLU
      activation of Molchanov 2017's baseline; for activations that can be negative, e.g. GELU, the mean
      absolute value).
    * ``kind="apoz"``: ``1 - APoZ_j``, APoZ being the fraction of exact zeros (Hu et al. 2016). APoZ prunes the
      *highest* APoZ; returning ``1 - APoZ`` keeps the package rule higher = keep. Only a ReLU-type activation
      before the gate gives exact zeros: a gate none of whose activations was exactly 0 (GELU, SiLU, a head or
      branch output) raises a `ConfigError` naming it, since every unit would score 1 and pruning would follow
      the unit order.

    Args:
        kind: ``"mean"`` or ``"apoz"``.
        dimensions: Gate dimensions to score (``"layers"`` is allowed: the branch output as one unit).
        max_batches: Use at most this many batches of ``data``.
    """

    needs_data = True

    def __init__(
        self,
        kind: Literal["mean", "apoz"] = "mean",
        dimensions: Sequence[str] = UNIT_DIMENSIONS,
        max_batches: int | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ConfigError(f"ActivationImportance: kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        self.kind, self.max_batches = kind, max_batches
        self.dimensions = check_dimensions("ActivationImportance", dimensions)

    @torch.no_grad()
    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        assert data is not None
        sums = [torch.zeros(ref.slot.gate.num_units, dtype=torch.float64) for ref in refs]
        counts = [0] * len(refs)

        def make_hook(i: int):
            def hook(slot: GateSlot, args: tuple[Any, ...], out: Tensor) -> None:
                x = args[0]
                a = slot.inner(x) if slot.inner is not None else x
                v = _unit_view(slot, a.detach())
                stat = v.abs() if self.kind == "mean" else (v == 0)
                sums[i] += stat.double().sum((0, 2)).cpu()
                counts[i] += v.shape[0] * v.shape[2]

            return hook

        handles = [ref.slot.register_forward_hook(make_hook(i)) for i, ref in enumerate(refs)]
        try:
            with scoring_mode(model, train=False):
                for batch in batches(data, self.max_batches, "ActivationImportance"):
                    model(to_model(model, split_batch(batch)[0]))
        finally:
            for h in handles:
                h.remove()
        out = {}
        for ref, s, c in zip(refs, sums, counts, strict=True):
            if c == 0:
                raise ConfigError(f"ActivationImportance: the gate {ref.gate_fqn!r} saw no activation")
            if self.kind == "apoz" and not bool(s.any()):
                raise ConfigError(_no_zero_message(ref, c * ref.slot.gate.num_units))
            out[ref.gate_fqn] = s / c if self.kind == "mean" else 1.0 - s / c
        return out

    def __repr__(self) -> str:
        return f"ActivationImportance(kind={self.kind!r}, dimensions={self.dimensions})"


def _no_zero_message(ref: SlotRef, count: int) -> str:
    """Why APoZ cannot rank the units of ``ref``'s gate: none of its ``count`` activations was exactly 0."""
    act = getattr(ref.layer, "act", None)
    after = f" (its layer's activation is {type(act).__name__})" if isinstance(act, nn.Module) else ""
    return (
        f"ActivationImportance(kind='apoz'): none of the {count} activations at the gate {ref.gate_fqn!r} of "
        f"{ref.layer_fqn or 'the model'!r}{after} was exactly 0, so every unit would score 1 and pruning would follow "
        "the unit order. APoZ needs a ReLU-type activation before the gate; use kind='mean' (importance="
        "'activation'), 'magnitude' or 'taylor', or leave this gate out (dimensions=...)"
    )


class LayerImportance(Importance):
    """Importance of each residual branch (``layers`` gate): the loss increase when the branch is closed.

    ``I = mean_b [L_b(branch closed) - L_b(model)]`` over the batches: a forward hook on the branch's gate sets
    its multiplier to 0 for one forward pass (every other gate as it is), so the block computes ``x + 0`` for that
    branch. A branch whose removal lowers the loss scores below 0. This is a direct measurement, not an estimate
    (one extra forward pass per branch and batch: use a few batches). Eval mode, ``no_grad``; flags, buffers and
    hooks are restored.

    Args:
        loss_fn: ``loss_fn(output, targets) -> scalar`` (default cross-entropy).
        max_batches: Use at most this many batches of ``data``.
    """

    needs_data = True

    def __init__(self, loss_fn: LossFn = F.cross_entropy, max_batches: int | None = None) -> None:
        if not callable(loss_fn):
            raise ConfigError(f"LayerImportance: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn, self.max_batches = loss_fn, max_batches
        self.dimensions = check_dimensions("LayerImportance", ("layers",), DIMENSIONS)

    @torch.no_grad()
    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        assert data is not None
        acc = torch.zeros(len(refs), dtype=torch.float64)
        n = 0
        with scoring_mode(model, train=False):
            for batch in batches(data, self.max_batches, "LayerImportance"):
                base = float(batch_loss(model, self.loss_fn, batch))
                for i, ref in enumerate(refs):
                    h = ref.slot.gate.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
                    try:
                        acc[i] += float(batch_loss(model, self.loss_fn, batch)) - base
                    finally:
                        h.remove()
                n += 1
        return {ref.gate_fqn: acc[i : i + 1] / n for i, ref in enumerate(refs)}

    def __repr__(self) -> str:
        return "LayerImportance()"

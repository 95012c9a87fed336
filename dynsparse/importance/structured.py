"""Per-unit importance of gated models: the `Importance` protocol, magnitude, random and Taylor scores.

An importance is a callable ``importance(model, data=None) -> {gate_fqn: (num_units,) scores}`` over the gates of a
gated model (``dynsparse.sparsify_``), with ``gate_fqn`` as `dynsparse.named_gates` and `dynsparse.fix_gates_`
name it (``"blocks.0.mlp.norm.gate"``, ``"blocks.0.drop_path1.gate"``). **Higher = more important = kept**.
Scores are plain float tensors on the CPU; `keep_masks` turns them into keep masks, and the decision ends in the
gates: ``ds.fix_gates_(model, keep_masks(scores, 0.5))`` then ``ds.convert(model)``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModuleError
from ..layers.base import unit_weights
from ..regularizers._common import UNIT_DIMENSIONS, SlotRef
from ..sparsify import DIMENSIONS
from ._util import (
    LossFn,
    batch_loss,
    batches,
    check_dimensions,
    double_backward_ok,
    gate_refs,
    scoring_mode,
)

__all__ = ["Importance", "MagnitudeImportance", "RandomImportance", "TaylorImportance"]


class Importance:
    """Base of the per-unit importance scores: ``importance(model, data=None) -> {gate_fqn: scores}``.

    Subclasses set ``dimensions`` (the gate dimensions they score) and implement `score`. Any other callable
    with the same signature and result works wherever an importance is expected.

    Attributes:
        dimensions: Dimension words of the gates scored (``"neurons"``, ``"heads"``, ``"channels"``, ``"layers"``).
        needs_data: Whether ``data`` (an iterable of batches) is required.
    """

    dimensions: tuple[str, ...] = DIMENSIONS
    needs_data: ClassVar[bool] = False

    def __call__(self, model: nn.Module, data: Iterable[Any] | None = None) -> dict[str, Tensor]:
        """``{gate_fqn: (num_units,) float scores on the CPU}`` for every gate of ``self.dimensions``.

        Raises:
            ConfigError: no gate of these dimensions in ``model``, or ``data`` missing when it is needed.
        """
        name = type(self).__name__
        refs = gate_refs(model, self.dimensions)
        if not refs:
            raise ConfigError(
                f"{name}: the model has no gate for dimensions {self.dimensions} (call dynsparse.sparsify_ first)"
            )
        if self.needs_data and data is None:
            raise ConfigError(f"{name} needs data: an iterable of batches (e.g. a DataLoader)")
        out = self.score(model, refs, data)
        return {k: v.detach().float().cpu() for k, v in out.items()}

    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        """Scores of the gates ``refs`` (what `__call__` returns, before the move to the CPU)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dimensions={self.dimensions})"


class MagnitudeImportance(Importance):
    """Norm of each unit's producer weights (L1 filter norm, Li et al. 2017; methods.md 2.6 and 2.9).

    The producers are what the gated layer lists (``GatedLayer.producers``): an MLP neuron's ``fc1`` row, a
    head's q/k/v rows, a channel's conv filter (and the depthwise filter of an inverted residual); of a masked
    producer (`dynsparse.prune.unstructured_`) the weight its forward uses, ``masked_weight()``. With
    ``p=1`` the score is ``Σ |w|``, with ``p=2`` it is ``sqrt(Σ w²)``, over every producer weight of the unit.

    Args:
        p: 1 or 2.
        bias: Count producer biases too (default: weights only, as in L1 filter pruning).
        dimensions: Unit dimensions to score (``layers`` gates own no producer weights).

    Raises:
        UnsupportedModuleError: a gated layer does not list its producer weights.
    """

    def __init__(self, p: int = 1, bias: bool = False, dimensions: Sequence[str] = UNIT_DIMENSIONS) -> None:
        if p not in (1, 2) or isinstance(p, bool):
            raise ConfigError(f"MagnitudeImportance: p must be 1 or 2, got {p!r}")
        self.p, self.bias = p, bool(bias)
        self.dimensions = check_dimensions("MagnitudeImportance", dimensions, UNIT_DIMENSIONS)

    @torch.no_grad()
    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        out = {}
        for ref in refs:
            try:
                producers = type(ref.layer).producers(ref.layer, ref.child)
            except NotImplementedError:
                raise UnsupportedModuleError(
                    ref.layer_fqn, type(ref.layer).__name__, ref.slot.dimension, "it does not list its producer weights"
                ) from None
            total = torch.zeros(ref.slot.gate.num_units, dtype=torch.float64)
            for prod in producers:
                if prod.param.endswith("bias") and not self.bias:
                    continue
                rows = unit_weights(ref.layer, prod).detach().double().cpu()
                total += rows.abs().sum(1) if self.p == 1 else rows.pow(2).sum(1)
            out[ref.gate_fqn] = total if self.p == 1 else total.sqrt()
        return out

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p}, bias={self.bias}, dimensions={self.dimensions})"


class RandomImportance(Importance):
    """I.i.d. uniform [0, 1) scores per unit, reproducible from ``seed`` (the random control; methods.md 2.2).

    Args:
        seed: Seed of the CPU generator; each call with the same model gives the same scores.
        dimensions: Dimensions to score (all four by default, ``layers`` included).
    """

    def __init__(self, seed: int = 0, dimensions: Sequence[str] = DIMENSIONS) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"RandomImportance: seed must be an int, got {seed!r}")
        self.seed = seed
        self.dimensions = check_dimensions("RandomImportance", dimensions)

    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return {ref.gate_fqn: torch.rand(ref.slot.gate.num_units, generator=g) for ref in refs}

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed}, dimensions={self.dimensions})"


class TaylorImportance(Importance):
    """Taylor importance through the gates (Molchanov et al. 2019, "Taylor-FO-BN"; methods.md 2.20).

    Every unit already has a gate multiplier ``z_j`` (1 when open), so no extra gate is needed: while scoring,
    a forward hook on each gate replaces its output by a leaf tensor holding the same values (``requires_grad``),
    and ``g_j = ∂L_b/∂z_j`` is the gradient of the batch loss ``L_b`` (mini-batch averaged, not per example).
    Because the slot multiplies the unit's activations ``a`` by ``z``, ``z_j·g_j = Σ a·∂L/∂a`` over the unit's
    elements, batch and positions: the group form ``(Σ_{s∈unit} g_s w_s)²`` with the gate as the group's weight.

    * ``order=1``: ``I_j = mean_b (z_j · g_j)²``, i.e. ``(∂L/∂z_j)²`` for an open gate.
    * ``order=2``: ``I_j = mean_b (z_j·g_j - ½ · z_j·(H z)_j)²``: the second-order criterion of Molchanov et al.
      2019, with the Hessian of ``L_b`` in the gate multipliers applied to the whole multiplier vector ``z``
      (one Hessian-vector product per batch by double back-prop). Needs a twice-differentiable forward;
      ``scaled_dot_product_attention`` is limited to its math kernel meanwhile (the fused CPU kernels have no
      double backward).

    The paper averages with momentum 0.9 between pruning steps; here the batches are averaged uniformly. A closed
    unit (``z_j = 0``) scores 0. The model runs in eval mode by default (deterministic gates, no BatchNorm
    update); flags, buffers and every ``.grad`` are left as they were, and the hooks are removed.

    Args:
        loss_fn: ``loss_fn(output, targets) -> scalar`` (default cross-entropy).
        order: 1 or 2.
        dimensions: Gate dimensions to score (``layers`` branch gates included by default).
        max_batches: Use at most this many batches of ``data``.
        train: Score in train mode instead (stochastic gates and dropout; buffers restored).
    """

    needs_data = True

    def __init__(
        self,
        loss_fn: LossFn = F.cross_entropy,
        order: int = 1,
        dimensions: Sequence[str] = DIMENSIONS,
        max_batches: int | None = None,
        train: bool = False,
    ) -> None:
        if order not in (1, 2) or isinstance(order, bool):
            raise ConfigError(f"TaylorImportance: order must be 1 or 2, got {order!r}")
        if not callable(loss_fn):
            raise ConfigError(f"TaylorImportance: loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn, self.order, self.max_batches, self.train = loss_fn, order, max_batches, bool(train)
        self.dimensions = check_dimensions("TaylorImportance", dimensions)

    def score(self, model: nn.Module, refs: list[SlotRef], data: Iterable[Any] | None) -> dict[str, Tensor]:
        assert data is not None
        leaves: dict[int, list[Tensor]] = defaultdict(list)

        def make_hook(i: int):
            def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
                z = out.detach().clone().requires_grad_(True)
                leaves[i].append(z)
                return z

            return hook

        acc = [torch.zeros(ref.slot.gate.num_units, dtype=torch.float64) for ref in refs]
        n = 0
        handles = [ref.slot.gate.register_forward_hook(make_hook(i)) for i, ref in enumerate(refs)]
        try:
            second = double_backward_ok() if self.order == 2 else contextlib.nullcontext()
            with scoring_mode(model, self.train), torch.enable_grad(), second:
                for batch in batches(data, self.max_batches, "TaylorImportance"):
                    leaves.clear()
                    loss = batch_loss(model, self.loss_fn, batch)
                    for i, t in enumerate(self._terms(loss, refs, leaves)):
                        acc[i] += t.detach().double().cpu().pow(2)
                    n += 1
        finally:
            for h in handles:
                h.remove()
        return {ref.gate_fqn: a / n for ref, a in zip(refs, acc, strict=True)}

    def _terms(self, loss: Tensor, refs: list[SlotRef], leaves: dict[int, list[Tensor]]) -> list[Tensor]:
        """Per gate, ``Σ_calls z·g`` (order 1) or ``Σ_calls z·g - ½ z·Hz`` (order 2), shape (num_units,)."""
        flat = list(itertools.chain.from_iterable(leaves.get(i, ()) for i in range(len(refs))))
        if not flat:
            raise ConfigError("TaylorImportance: the forward pass reached no gate")
        second = self.order == 2
        gs = torch.autograd.grad(loss, flat, create_graph=second, allow_unused=True)
        gs = [torch.zeros_like(z) if g is None else g for z, g in zip(flat, gs, strict=True)]
        terms = [z.detach() * g for z, g in zip(flat, gs, strict=True)]
        if second:
            hvp = sum((g * z.detach()).sum() for z, g in zip(flat, gs, strict=True))
            if isinstance(hvp, Tensor) and hvp.requires_grad:
                hz = torch.autograd.grad(hvp, flat, allow_unused=True)
                hz = [torch.zeros_like(z) if h is None else h for z, h in zip(flat, hz, strict=True)]
            else:  # the loss is linear in the multipliers
                hz = [torch.zeros_like(z) for z in flat]
            terms = [t.detach() - 0.5 * z.detach() * h for t, z, h in zip(terms, flat, hz, strict=True)]
        out, pos = [], 0
        for i, ref in enumerate(refs):
            total = torch.zeros(ref.slot.gate.num_units, dtype=torch.float64)
            for _ in leaves.get(i, ()):
                total += terms[pos].detach().double().cpu().reshape(-1)
                pos += 1
            out.append(total)
        return out

    def __repr__(self) -> str:
        return f"TaylorImportance(order={self.order}, dimensions={self.dimensions})"

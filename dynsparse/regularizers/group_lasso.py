"""Group lasso over the units of gated dimensions: structured sparsity learning (SSL, Wen et al. 2016).

Each unit of a gate (an MLP neuron, an attention head, a block's internal channel) is one group: the weights
that *produce* it, as its gated layer lists them (``GatedLayer.producers``: the ``fc1`` row and bias of a
neuron, the q/k/v rows of a head, the conv filter of a channel), as the forward uses them (a producer masked by
unstructured pruning counts with its ``masked_weight()``). The regulariser is

    R(W) = λ · Σ_g sqrt(‖w_g‖₂² + eps)

with no sqrt-of-group-size factor (as in SSL; the ``eps`` of the SBP repo's SSL code keeps the gradient
finite at 0). Two ways to optimise it (methods.md 2.14):

* add ``reg()`` to the loss (subgradient descent, what SSL did), then threshold the group norms; or
* call ``prox_step_(lr)`` after each optimizer step: block soft-thresholding
  ``w_g ← w_g · max(0, 1 − lr·λ / ‖w_g‖₂)``, which gives exact zeros. Exact for plain SGD with step ``lr``;
  with Adam or momentum it is the usual heuristic.

Either way ``keep_masks()`` turns the surviving groups into keep masks for `dynsparse.fix_gates_`, and
`dynsparse.convert` then slices the zero groups away. The decision ends in the gates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModuleError
from ..layers.base import Producer, unit_weights
from ._common import SlotRef, check_dimensions, check_min_keep, check_weight, gated_slots, keep_at_least

__all__ = ["GroupLasso"]


class _Entry(NamedTuple):
    ref: SlotRef
    producers: tuple[Producer, ...]
    num_units: int


class GroupLasso:
    """SSL group lasso over the producer weights of every unit of the gated layers of ``model``.

    The groups are found once, at construction (call it after ``sparsify_``); the weights are read at every
    call, so the regulariser follows training. For a different ``λ`` per dimension (SSL's ``λ_n``, ``λ_c``)
    build one ``GroupLasso`` per dimension.

    Args:
        model: A gated model (``dynsparse.sparsify_``).
        dimensions: Dimension words whose units are groups (``"neurons"``, ``"heads"``, ``"channels"``).
        weight: ``λ`` (>= 0).
        eps: Added under the square root of each group norm in ``__call__``.

    Raises:
        ConfigError: a bad argument, or no gated layer of these dimensions in ``model``.
        UnsupportedModuleError: a gated layer does not list its producer weights.

    Examples:
        >>> import timm, dynsparse as ds
        >>> model = ds.sparsify_(timm.create_model("test_vit"), {"neurons": "fixed", "heads": "fixed"})
        >>> reg = GroupLasso(model, weight=1e-4)
        >>> loss = task_loss + reg()                  # doctest: +SKIP
        >>> loss.backward(); opt.step()               # doctest: +SKIP
        >>> _ = reg.prox_step_(lr=0.1)                # exact zeros; or rely on the subgradient alone
        >>> model = ds.fix_gates_(model, reg.keep_masks())
        >>> small = ds.convert(model)                 # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        dimensions: Iterable[str] = ("neurons", "heads", "channels"),
        weight: float = 1e-4,
        eps: float = 1e-16,
    ) -> None:
        self.dimensions = check_dimensions("GroupLasso", dimensions)
        self.weight = check_weight("GroupLasso", weight)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
            raise ConfigError(f"GroupLasso: eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self._entries: list[_Entry] = []
        for ref in gated_slots(model, self.dimensions):
            layer_type = type(ref.layer)
            try:
                producers = tuple(layer_type.producers(ref.layer, ref.child))
            except NotImplementedError:
                raise UnsupportedModuleError(
                    ref.layer_fqn, layer_type.__name__, ref.slot.dimension, "it does not list its producer weights"
                ) from None
            n = ref.slot.gate.num_units
            for p in producers:
                if p.index.dim() != 2 or p.index.shape[0] != n:
                    raise UnsupportedModuleError(
                        ref.layer_fqn,
                        layer_type.__name__,
                        ref.slot.dimension,
                        f"producer {p.param!r} has an index of shape {tuple(p.index.shape)}, expected ({n}, k)",
                    )
            if producers:
                self._entries.append(_Entry(ref, producers, n))
        if not self._entries:
            raise ConfigError(
                f"GroupLasso: the model has no gated layer for dimensions {self.dimensions} "
                "(call dynsparse.sparsify_ first)"
            )

    # ------------------------------------------------------------------------------------------------ core
    def _squared_norms(self, e: _Entry) -> Tensor:
        """(num_units,) ‖w_g‖₂² of each group (of the weights the forward uses), differentiable; in float32 at least.

        Half precision would overflow (‖w_g‖² > 65504) or lose ``eps`` (so ``sqrt(0)`` gives nan gradients).
        """
        total = None
        for p in e.producers:
            rows = unit_weights(e.ref.layer, p)
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            sq = rows.pow(2).sum(1)
            total = sq if total is None else total + sq.to(total.dtype)
        assert total is not None
        return total

    def __call__(self) -> Tensor:
        """Scalar ``λ · Σ_g sqrt(‖w_g‖₂² + eps)`` over every group, differentiable w.r.t. the weights."""
        terms = [torch.sqrt(self._squared_norms(e) + self.eps).sum() for e in self._entries]
        return self.weight * torch.stack([t.to(terms[0].dtype) for t in terms]).sum()

    @torch.no_grad()
    def prox_step_(self, lr: float) -> GroupLasso:
        """Block soft-thresholding of every group, in place: ``w_g ← w_g · max(0, 1 − lr·λ/‖w_g‖₂)``.

        Groups with ``‖w_g‖₂ <= lr·λ`` become exact zeros. One vectorised scale per producer parameter (no loop
        over units). Call it right after ``optimizer.step()``.

        Args:
            lr: The step size of the optimizer step just taken (>= 0).

        Returns:
            ``self``.
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < float("inf"):
            raise ConfigError(f"GroupLasso.prox_step_: lr must be a finite number >= 0, got {lr!r}")
        shrink = float(lr) * self.weight
        if shrink == 0.0:
            return self
        for e in self._entries:
            norm = self._squared_norms(e).sqrt()
            scale = (1.0 - shrink / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_min(0.0)
            for p in e.producers:
                w = e.ref.layer.get_parameter(p.param)
                idx = p.index.to(w.device)
                full = torch.ones(w.shape[p.dim], dtype=w.dtype, device=w.device)
                full[idx.flatten()] = scale.to(w.dtype).repeat_interleave(idx.shape[1])
                shape = [1] * w.ndim
                shape[p.dim] = -1
                w.mul_(full.view(shape))
        return self

    # --------------------------------------------------------------------------------------------- reading
    @torch.no_grad()
    def group_norms(self) -> dict[str, Tensor]:
        """``{gate_fqn: (num_units,) ‖w_g‖₂}`` (no ``eps``), detached."""
        return {e.ref.gate_fqn: self._squared_norms(e).sqrt() for e in self._entries}

    def keep_masks(self, threshold: float = 1e-5, min_keep: int = 1) -> dict[str, Tensor]:
        """``{gate_fqn: (num_units,) bool}`` keeping the groups with ``‖w_g‖₂ > threshold``, for ``fix_gates_``.

        Args:
            threshold: Groups at or below it count as zero (the SSL reference code uses 1e-5).
            min_keep: Keep at least this many units per gate (the largest norms), so no gate closes entirely.
        """
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ConfigError(f"GroupLasso.keep_masks: threshold must be a number >= 0, got {threshold!r}")
        min_keep = check_min_keep("GroupLasso.keep_masks", min_keep)
        return {fqn: keep_at_least(norm > threshold, norm, min_keep) for fqn, norm in self.group_norms().items()}

    def gate_fqns(self) -> list[str]:
        """Qualified names of the gates whose units are groups, in module order."""
        return [e.ref.gate_fqn for e in self._entries]

    def __repr__(self) -> str:
        units = sum(e.num_units for e in self._entries)
        return (
            f"GroupLasso(dimensions={self.dimensions}, weight={self.weight:g}, eps={self.eps:g}, "
            f"gates={len(self._entries)}, groups={units})"
        )

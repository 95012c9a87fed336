"""Network slimming (Liu et al. 2017): an L1 penalty on BatchNorm scales, then a global percentile cut.

The objective is ``L = Σ l(f(x, W), y) + λ Σ_{γ∈Γ} |γ|`` over BN scale factors ``γ`` (methods.md 2.7). The
reference implementation does not add the penalty to the loss: after ``backward()`` it adds the subgradient
``λ·sign(γ)`` to ``γ.grad`` (its ``-sr --s`` flag); ``add_subgradient_()`` does the same, ``__call__()`` gives the
penalty as a loss term instead. Pruning takes one global threshold, the p-th percentile of all ``|γ|``; a
per-gate minimum of kept channels guards against the known failure of a layer pruned away. The channels that
can be pruned are those of the ``channels`` gates whose gated layer names the BN of its units
(``GatedLayer.unit_norm``), so the decision ends in the gates: ``keep_masks()`` feeds `dynsparse.fix_gates_`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..errors import ConfigError, UnsupportedModuleError
from ..gates.functional import topk_mask
from ._common import UNIT_DIMENSIONS, check_min_keep, check_weight, gated_slots, keep_at_least, zero_like_params

__all__ = ["BNScaleL1"]


class _GatedNorm(NamedTuple):
    gate_fqn: str
    norm_fqn: str
    norm: _BatchNorm


class BNScaleL1:
    """L1 on BatchNorm scales (network slimming) and the global-percentile keep masks of gated channels.

    Args:
        model: A model; for ``scope="gated"`` and for ``keep_masks`` it must be gated for ``channels``
            (``dynsparse.sparsify_(model, {"channels": "fixed"})``).
        weight: ``λ`` (>= 0); the reference uses 1e-4 for VGG, 1e-5 for ResNet and DenseNet.
        scope: ``"gated"`` penalises the BNs whose channels are gate units; ``"all"`` every BatchNorm with a
            scale (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their subclasses such as timm's ``BatchNormAct2d``;
            the reference, conv nets only, takes every ``BatchNorm2d``). A BN feeding a residual sum is then
            shrunk but never pruned.

    Raises:
        ConfigError: a bad argument, or no BatchNorm in scope.

    Examples:
        >>> import timm, dynsparse as ds
        >>> model = ds.sparsify_(timm.create_model("test_resnet"), {"channels": "fixed"})
        >>> slim = BNScaleL1(model, weight=1e-5)
        >>> loss.backward(); slim.add_subgradient_(); opt.step()      # doctest: +SKIP
        >>> model = ds.fix_gates_(model, slim.keep_masks(prune_ratio=0.5))
    """

    def __init__(self, model: nn.Module, weight: float = 1e-5, scope: Literal["gated", "all"] = "gated") -> None:
        self.weight = check_weight("BNScaleL1", weight)
        if scope not in ("gated", "all"):
            raise ConfigError(f"BNScaleL1: scope must be 'gated' or 'all', got {scope!r}")
        self.scope = scope
        self._gated: list[_GatedNorm] = []
        for ref in gated_slots(model, UNIT_DIMENSIONS):
            name = type(ref.layer).unit_norm(ref.layer, ref.child)
            if name is None:
                continue
            norm = ref.layer.get_submodule(name)
            norm_fqn = f"{ref.layer_fqn}.{name}" if ref.layer_fqn else name
            why = None
            if not isinstance(norm, _BatchNorm):
                why = f"its unit norm {name!r} is a {type(norm).__name__}, not a BatchNorm"
            elif norm.weight is None:
                why = f"its unit norm {name!r} has no scale (affine=False)"
            elif norm.num_features != ref.slot.gate.num_units:
                why = f"its unit norm {name!r} has {norm.num_features} channels, the gate {ref.slot.gate.num_units}"
            if why is not None:
                raise UnsupportedModuleError(ref.layer_fqn, type(ref.layer).__name__, ref.slot.dimension, why)
            self._gated.append(_GatedNorm(ref.gate_fqn, norm_fqn, norm))
        if scope == "gated":
            norms = [g.norm for g in self._gated]
        else:
            # every BatchNorm flavour: 1d / 2d / 3d, SyncBatchNorm (DDP), timm's BatchNormAct2d / SyncBatchNormAct
            norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.weight is not None]
            lazy = [type(m).__name__ for m in norms if is_lazy(m.weight)]
            if lazy:
                raise ConfigError(f"BNScaleL1(scope='all'): a {lazy[0]} is not initialised yet; run one forward first")
        seen: set[int] = set()
        self._norms: list[_BatchNorm] = [m for m in norms if not (id(m) in seen or seen.add(id(m)))]
        if not self._norms:
            what = "no gated layer with a BatchNorm on its units" if scope == "gated" else "no affine BatchNorm"
            raise ConfigError(f"BNScaleL1(scope={scope!r}): the model has {what}")
        self._zero = zero_like_params(model)

    def __call__(self) -> Tensor:
        """Scalar ``λ · Σ |γ|`` over the BatchNorms in scope, differentiable w.r.t. their scales.

        Summed in float32 at least: in float16, ``Σ |γ|`` over a large net's channels overflowed to inf.
        """
        total = torch.stack(
            [m.weight.abs().sum(dtype=torch.promote_types(m.weight.dtype, torch.float32)) for m in self._norms]
        ).sum()
        return self.weight * total

    @torch.no_grad()
    def add_subgradient_(self) -> BNScaleL1:
        """Add ``λ·sign(γ)`` to ``γ.grad`` of every BatchNorm in scope (after ``backward()``, before the step).

        A scale without a gradient yet gets ``λ·sign(γ)`` as its gradient; frozen scales are skipped.

        Returns:
            ``self``.
        """
        for m in self._norms:
            g = m.weight
            if not g.requires_grad:
                continue
            sub = torch.sign(g) * self.weight
            if g.grad is None:
                g.grad = sub
            else:
                g.grad.add_(sub)
        return self

    @torch.no_grad()
    def scales(self) -> dict[str, Tensor]:
        """``{gate_fqn: (num_units,) |γ|}`` of the BN of every gated layer's units (detached)."""
        return {g.gate_fqn: g.norm.weight.detach().abs() for g in self._gated}

    def keep_masks(
        self,
        prune_ratio: float | None = None,
        *,
        threshold: float | None = None,
        scope: Literal["global", "layer"] = "global",
        min_keep: int = 1,
    ) -> dict[str, Tensor]:
        """``{gate_fqn: (num_units,) bool}`` keep masks of the gated channels by ``|γ|``, for ``fix_gates_``.

        Args:
            prune_ratio: Fraction of the channels to prune (default 0.5 when ``threshold`` is not given):
                ``floor(prune_ratio · total)`` channels with the smallest ``|γ|`` are pruned, over all gated
                channels (``scope="global"``, the paper) or within each gate (``scope="layer"``). Among equal ``|γ|``
                the lower index is kept. (The reference code cuts at ``|γ| > sorted[int(total·p)]``, one channel more.)
            threshold: Keep the channels with ``|γ| > threshold`` instead (a global cut).
            scope: ``"global"`` or ``"layer"`` (with ``prune_ratio`` only).
            min_keep: Keep at least this many channels per gate (the largest ``|γ|``).

        Raises:
            ConfigError: bad arguments, both ``prune_ratio`` and ``threshold``, or no gated BN.
        """
        if not self._gated:
            raise ConfigError("BNScaleL1.keep_masks: the model has no gated layer with a BatchNorm on its units")
        if scope not in ("global", "layer"):
            raise ConfigError(f"BNScaleL1.keep_masks: scope must be 'global' or 'layer', got {scope!r}")
        min_keep = check_min_keep("BNScaleL1.keep_masks", min_keep)
        scores = self.scales()
        if threshold is not None:
            if prune_ratio is not None:
                raise ConfigError("BNScaleL1.keep_masks: give prune_ratio or threshold, not both")
            if scope != "global":
                raise ConfigError("BNScaleL1.keep_masks: a threshold is global; scope='layer' needs prune_ratio")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
                raise ConfigError(f"BNScaleL1.keep_masks: threshold must be a number >= 0, got {threshold!r}")
            masks = {fqn: s > threshold for fqn, s in scores.items()}
        else:
            p = 0.5 if prune_ratio is None else prune_ratio
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"BNScaleL1.keep_masks: prune_ratio must be in [0, 1], got {prune_ratio!r}")
            if scope == "global":
                flat = torch.cat([s.float().cpu() for s in scores.values()])
                keep = _keep_largest(flat, p)
                masks, start = {}, 0
                for fqn, s in scores.items():
                    masks[fqn] = keep[start : start + s.numel()].to(s.device)
                    start += s.numel()
            else:
                masks = {fqn: _keep_largest(s, p) for fqn, s in scores.items()}
        return {fqn: keep_at_least(m, scores[fqn], min_keep) for fqn, m in masks.items()}

    def __repr__(self) -> str:
        return (
            f"BNScaleL1(weight={self.weight:g}, scope={self.scope!r}, norms={len(self._norms)}, "
            f"gated_norms={len(self._gated)})"
        )


def _keep_largest(scores: Tensor, prune_ratio: float) -> Tensor:
    """Bool mask pruning the ``floor(prune_ratio · N)`` smallest scores (among ties the lower index is kept)."""
    n = scores.numel()
    k = min(n, math.floor(prune_ratio * n + 1e-9))
    return topk_mask(scores, n - k)

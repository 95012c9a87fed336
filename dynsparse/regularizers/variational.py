"""Sparse variational dropout (Molchanov, Ashukha & Vetrov, ICML 2017), per weight and per unit.

Per weight (unstructured): `LinearSVDO` / `Conv2dSVDO` are drop-in subclasses of ``nn.Linear`` / ``nn.Conv2d``
with a posterior ``q(w) = N(θ, σ²)`` per weight. ``weight`` is θ (names kept, so host checkpoints load; the
only new key is ``log_sigma2``, initialised to -10). With the additive reparameterisation
``log α = log σ² − log(θ² + 1e-8)``, clipped to [-8, 8]:

* training uses the local reparameterisation trick: ``mean = x θᵀ + b``, ``var = x² σ²ᵀ``,
  ``out = mean + sqrt(var + 1e-8)·ε`` (the conv version convolves ``x`` with θ and ``x²`` with σ²);
* eval is deterministic, with the weights whose ``log α > threshold`` (3, dropout rate > 0.95) zeroed;
* ``kl()`` is the paper's approximation (eq. 14) of the KL to the log-uniform prior, summed over weights:
  ``−KL ≈ k1·σ(k2 + k3·log α) − ½·log(1 + α⁻¹) − k1``, k1 = 0.63576, k2 = 1.87320, k3 = 1.48695.

The training objective is the SGVLB ``mean CE + kl_weight(epoch) · svd_kl(model) / N`` (N = dataset size).
`sparse_vd_` swaps a model's layers in, `remove_svd_` swaps plain torch layers back with the pruned
weights zeroed. This is compression, not speed: unstructured zeros do not make a dense kernel faster.

Per unit (structured): `VariationalGate` is a gate (registered as ``"variational"``) with multiplicative
Gaussian noise ``z = 1 + sqrt(α)·ε`` per unit and the same KL as its penalty, so variational dropout on
neurons, heads or channels ends in a gate like every other method.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, GateError
from ..gates import Gate, register_gate
from ..modules import adopt, replace_module_, successor_state
from ..sparsify import _patterns

__all__ = [
    "K1",
    "K2",
    "K3",
    "Conv2dSVDO",
    "LinearSVDO",
    "SVDSparsity",
    "VariationalGate",
    "kl_approx",
    "kl_weight",
    "remove_svd_",
    "sparse_vd_",
    "svd_kl",
    "svd_log_alpha",
    "svd_masks",
    "svd_sparsity",
]

#: Constants of the KL approximation, Molchanov et al. (2017) eq. 14.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: Reference-code clip of log α and the pruning threshold (log α > 3 <=> dropout rate > 0.95).
LOG_ALPHA_CLIP = (-8.0, 8.0)
THRESHOLD = 3.0


# ----------------------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------------------


def kl_approx(log_alpha: Tensor) -> Tensor:
    """Elementwise approximate ``KL(q || log-uniform prior)`` (eq. 14), ``>= 0`` and decreasing in ``log α``.

    ``KL = k1 − k1·sigmoid(k2 + k3·log α) + ½·softplus(−log α)`` (softplus for ``log(1 + α⁻¹)``, stable).

    Args:
        log_alpha: Any shape.

    Returns:
        Same shape as ``log_alpha``.
    """
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def svd_log_alpha(weight: Tensor, log_sigma2: Tensor, clip: tuple[float, float] = LOG_ALPHA_CLIP) -> Tensor:
    """``log α = clamp(log σ² − log(θ² + 1e-8), *clip)`` (additive reparameterisation), elementwise.

    Computed in float32 at least (the 1e-8 vanishes in float16: a zero weight gave nan gradients), returned in
    ``weight``'s dtype.
    """
    wide = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(wide)
    return torch.clamp(log_sigma2.to(wide) - torch.log(w * w + 1e-8), *clip).to(weight.dtype)


def _lrt_noise(mean: Tensor, var: Tensor) -> Tensor:
    """``mean + sqrt(var + 1e-8)·ε`` (local reparameterisation), the square root in float32 at least."""
    std = torch.sqrt(var.to(torch.promote_types(var.dtype, torch.float32)) + 1e-8).to(mean.dtype)
    return mean + std * torch.randn_like(mean)


def kl_weight(epoch: float, start: float = 5, end: float = 20) -> float:
    """KL warm-up: 0 before ``start``, linear to 1 at ``end``, then 1 (reference: 0 below epoch 5, 1 from 20).

    ``epoch`` may be fractional (step / steps_per_epoch). ``end <= start`` gives a step at ``start``.

    Raises:
        ConfigError: ``epoch``, ``start`` or ``end`` is not a finite number (a NaN epoch gave a NaN weight).
    """
    for name, v in (("epoch", epoch), ("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"kl_weight: {name} must be a finite number, got {v!r}")
    if epoch < start:
        return 0.0
    if epoch >= end:
        return 1.0
    return float(epoch - start) / float(end - start)


# ----------------------------------------------------------------------------------------------------------------
# Per-weight layers
# ----------------------------------------------------------------------------------------------------------------


class _SVDO:
    """Shared state and maths of the sparse-VD layers (a mixin placed before the torch layer class)."""

    host_class: type[nn.Module]
    weight: nn.Parameter
    bias: nn.Parameter | None
    log_sigma2: nn.Parameter
    threshold: float

    def _init_svdo(self, threshold: float, init_log_sigma2: float) -> None:
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ConfigError(f"{type(self).__name__}: threshold must be a finite number, got {threshold!r}")
        if isinstance(init_log_sigma2, bool) or not (
            isinstance(init_log_sigma2, (int, float)) and math.isfinite(init_log_sigma2)
        ):
            raise ConfigError(f"{type(self).__name__}: init_log_sigma2 must be finite, got {init_log_sigma2!r}")
        self.threshold = float(threshold)
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight.detach(), float(init_log_sigma2)))

    @classmethod
    def from_module(cls, host: nn.Module, *, threshold: float = THRESHOLD, init_log_sigma2: float = -10.0) -> _SVDO:
        """The sparse-VD twin of ``host`` (exact type ``host_class``), sharing its weight and bias (no copy).

        Hooks, device, dtype and the training flag are kept; ``log_sigma2`` is added.
        """
        if type(host) is not cls.host_class:
            raise ConfigError(
                f"{cls.__name__}.from_module needs a {cls.host_class.__name__}, got {type(host).__name__}"
            )
        new = adopt(host, cls)  # type: ignore[arg-type]
        new._init_svdo(threshold, init_log_sigma2)
        return new

    @property
    def log_alpha(self) -> Tensor:
        """Clipped ``log α`` per weight (same shape as ``weight``), differentiable."""
        return svd_log_alpha(self.weight, self.log_sigma2)

    def weight_mask(self) -> Tensor:
        """Bool keep mask of the weights, ``log α <= threshold`` (same shape as ``weight``)."""
        with torch.no_grad():
            return self.log_alpha <= self.threshold

    def kl(self) -> Tensor:
        """Scalar approximate KL summed over the weights (bias is not variational); float32 at least."""
        la = self.log_alpha
        return kl_approx(la.to(torch.promote_types(la.dtype, torch.float32))).sum()

    def _pruned_weight(self) -> Tensor:
        return self.weight * self.weight_mask().to(self.weight.dtype)

    def to_host(self) -> nn.Module:
        """A plain torch layer sharing this layer's weight and bias (``log_sigma2`` and threshold dropped).

        The weight is not changed here: `remove_svd_` zeroes the pruned weights first.
        """
        host = self.host_class.__new__(self.host_class)
        state = successor_state(self)  # hook dicts shared: handles registered on this layer keep working
        state["_parameters"].pop("log_sigma2", None)
        state.pop("threshold", None)
        host.__dict__.update(state)
        return host


class LinearSVDO(_SVDO, nn.Linear):
    """``nn.Linear`` with sparse variational dropout on every weight.

    Same constructor arguments (``in_features, out_features, bias, device, dtype``) and state-dict keys as
    ``nn.Linear`` plus ``log_sigma2``.

    Args:
        threshold: Weights with ``log α > threshold`` are zeroed in eval (3).
        init_log_sigma2: Initial ``log σ²`` of every weight (-10).

    Shapes:
        x: (*, in_features) -> (*, out_features).

    Examples:
        >>> layer = LinearSVDO(300, 100)
        >>> loss = layer(torch.randn(8, 300)).square().mean() + layer.kl() / 60000
    """

    host_class = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        threshold: float = THRESHOLD,
        init_log_sigma2: float = -10.0,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_svdo(threshold, init_log_sigma2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = F.linear(x, self.weight, self.bias)
            var = F.linear(x * x, torch.exp(self.log_sigma2))
            return _lrt_noise(mean, var)
        return F.linear(x, self._pruned_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


class Conv2dSVDO(_SVDO, nn.Conv2d):
    """``nn.Conv2d`` with sparse variational dropout on every weight.

    Same constructor arguments and state-dict keys as ``nn.Conv2d`` plus ``log_sigma2``; ``threshold`` and
    ``init_log_sigma2`` are keyword-only, as in `LinearSVDO`. Training convolves ``x`` with θ (plus bias) for
    the mean and ``x²`` with σ² for the variance (same stride, padding, dilation, groups).

    Shapes:
        x: (B, C_in, H, W) -> (B, C_out, H', W').
    """

    host_class = nn.Conv2d

    def __init__(self, *args, threshold: float = THRESHOLD, init_log_sigma2: float = -10.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_svdo(threshold, init_log_sigma2)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean = self._conv_forward(x, self.weight, self.bias)
            var = self._conv_forward(x * x, torch.exp(self.log_sigma2), None)
            return _lrt_noise(mean, var)
        return self._conv_forward(x, self._pruned_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}"


_TWINS: dict[type[nn.Module], type[_SVDO]] = {nn.Linear: LinearSVDO, nn.Conv2d: Conv2dSVDO}


def _svdo_modules(model: nn.Module) -> list[tuple[str, _SVDO]]:
    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, _SVDO)]


def sparse_vd_(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    threshold: float = THRESHOLD,
    init_log_sigma2: float = -10.0,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` (exact type) of ``model`` for its sparse-VD twin, in place.

    The twins share the original weight and bias tensors (an optimizer built before still holds them; add
    the new ``log_sigma2`` parameters to it). State-dict keys are kept; ``<fqn>.log_sigma2`` is new.

    Args:
        model: The model (not itself a Linear/Conv2d).
        include: fqn glob patterns; only matching layers are swapped.
        exclude: fqn glob patterns; matching layers are not swapped.
        threshold: Pruning threshold on ``log α`` (3).
        init_log_sigma2: Initial ``log σ²`` (-10).

    Returns:
        ``model``.

    Raises:
        ConfigError: nothing matched, or bad patterns.
    """
    inc, exc = _patterns(include, "sparse_vd_: include"), _patterns(exclude, "sparse_vd_: exclude")
    targets = []
    for fqn, m in model.named_modules():
        if type(m) not in _TWINS:
            continue
        if inc and not any(fnmatch.fnmatchcase(fqn, p) for p in inc):
            continue
        if any(fnmatch.fnmatchcase(fqn, p) for p in exc):
            continue
        if not fqn:
            raise ConfigError(
                f"sparse_vd_: the root module is a {type(m).__name__}; swap it with "
                f"{_TWINS[type(m)].__name__}.from_module instead"
            )
        targets.append((fqn, m))
    if not targets:
        raise ConfigError("sparse_vd_: no nn.Linear or nn.Conv2d matched (check include/exclude)")
    for fqn, m in targets:
        twin = _TWINS[type(m)].from_module(m, threshold=threshold, init_log_sigma2=init_log_sigma2)
        replace_module_(model, fqn, twin)
    return model


def svd_kl(model: nn.Module) -> Tensor:
    """Scalar sum of ``kl()`` over every sparse-VD layer of ``model`` (0 when there is none)."""
    terms = [m.kl() for _, m in _svdo_modules(model)]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


def svd_masks(model: nn.Module) -> dict[str, Tensor]:
    """``{layer_fqn: bool keep mask of the weight}`` of every sparse-VD layer (``log α <= threshold``)."""
    return {fqn: m.weight_mask() for fqn, m in _svdo_modules(model)}


@dataclass(frozen=True)
class SVDSparsity:
    """Fraction of sparse-VD weights pruned (``log α > threshold``), overall and per layer fqn."""

    sparsity: float
    pruned: int
    total: int
    layers: dict[str, float] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        """``total / kept`` (the paper's "×" compression of the variational weights)."""
        kept = self.total - self.pruned
        return float("inf") if kept == 0 else self.total / kept


def svd_sparsity(model: nn.Module) -> SVDSparsity:
    """Sparsity of the sparse-VD layers of ``model``: fraction of weights with ``log α > threshold``."""
    pruned = total = 0
    layers = {}
    for fqn, m in _svdo_modules(model):
        mask = m.weight_mask()
        p, n = int((~mask).sum()), mask.numel()
        layers[fqn] = p / n
        pruned, total = pruned + p, total + n
    if total == 0:
        raise ConfigError("svd_sparsity: the model has no sparse-VD layer (call sparse_vd_ first)")
    return SVDSparsity(pruned / total, pruned, total, layers)


def remove_svd_(model: nn.Module) -> nn.Module:
    """Swap every sparse-VD layer back to its plain torch class with the pruned weights zeroed, in place.

    The weights (shared with the sparse-VD layers) are zeroed where ``log α > threshold``; ``log_sigma2`` is
    dropped, so the state-dict keys are the host's again. Read `svd_masks` first to keep the masks.

    Returns:
        ``model``, with plain ``nn.Linear`` / ``nn.Conv2d`` layers.
    """
    layers = _svdo_modules(model)
    if any(not fqn for fqn, _ in layers):  # before any change: a failed call leaves the model as it was
        raise ConfigError(
            "remove_svd_: the root module is a sparse-VD layer; zero its pruned weights "
            "(weight.mul_(weight_mask())) and call its to_host() instead"
        )
    for fqn, m in layers:
        with torch.no_grad():
            m.weight.mul_(m.weight_mask().to(m.weight.dtype))
        replace_module_(model, fqn, m.to_host())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Per-unit gate
# ----------------------------------------------------------------------------------------------------------------


@register_gate("variational")
class VariationalGate(Gate):
    """Structured sparse variational dropout: multiplicative Gaussian noise per unit, ``z = 1 + sqrt(α)·ε``.

    Training draws one ``ε ~ N(0, 1)`` per unit per forward (shared by the batch, like `HardConcreteGate`), so
    the multiplier has mean 1 and variance α; it is *not* confined to [0, 1]. ``log α`` is learnt; the
    penalty is the sparse-VD KL approximation (`kl_approx`) summed over units, which pushes ``log α`` up until
    the data term resists. Noise, penalty and ``expected_keep()`` read ``log α`` clipped to ``log_alpha_range``
    ([-8, 8]) as the reference code does, so no term drives it past the clip. Eval is 1 for units with
    ``log α <= threshold`` and 0 for the others (the dropout rate α/(1+α) of a dropped unit is above 0.95 for the
    default threshold 3).

    ``expected_keep()`` is the smooth proxy ``1/(1+α) = sigmoid(−log α)``, the keep probability of the binary
    dropout equivalent to Gaussian noise of variance α (Srivastava et al. 2014; Kingma et al. 2015). It is
    differentiable (for budgets) and below 0.05 exactly where the unit is dropped with the default threshold.

    Args:
        num_units: Number of units.
        init_log_alpha: Initial ``log α`` of every unit (-8: nearly noise-free, and open).
        threshold: Units with ``log α > threshold`` are dropped (3).
        log_alpha_range: Clip of ``log α`` ([-8, 8], the reference code's): the training noise, the penalty and
            ``expected_keep()`` use the clipped value (outside it, only the gradients that lead back in), and
            ``constrain_()`` clamps the parameter itself to it (call after the optimizer step, optional).
        device: Device of the parameter.
        dtype: Dtype of the parameter.

    Examples:
        >>> g = VariationalGate(4).eval()
        >>> g()
        tensor([1., 1., 1., 1.])
    """

    #: Range of the training multiplier (Gaussian noise is unbounded; eval values are 0 or 1).
    train_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)

    def __init__(
        self,
        num_units: int,
        init_log_alpha: float = -8.0,
        threshold: float = THRESHOLD,
        log_alpha_range: tuple[float, float] = LOG_ALPHA_CLIP,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units)
        for what, v in (("init_log_alpha", init_log_alpha), ("threshold", threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise GateError(f"VariationalGate: {what} must be a finite number, got {v!r}")
        ok = isinstance(log_alpha_range, (tuple, list)) and len(log_alpha_range) == 2
        if not ok or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in log_alpha_range):
            raise GateError(
                f"VariationalGate: log_alpha_range must be (low, high), two numbers, got {log_alpha_range!r}"
            )
        lo, hi = (float(v) for v in log_alpha_range)
        if not lo < hi:
            raise GateError(f"VariationalGate: log_alpha_range must be (low, high), low < high, got {log_alpha_range}")
        self.init_log_alpha = float(init_log_alpha)
        self.threshold = float(threshold)
        self.log_alpha_range = (lo, hi)
        self.log_alpha = nn.Parameter(torch.empty(num_units, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every ``log α`` to ``init_log_alpha``."""
        with torch.no_grad():
            self.log_alpha.fill_(self.init_log_alpha)

    def clipped_log_alpha(self) -> Tensor:
        """``clamp(log α, *log_alpha_range)``, differentiable: no gradient moves ``log α`` further out of the range.

        As in the reference code (``clip`` in ``DenseVarDropOutARD``: one clipped ``log α`` feeds the training
        noise and the KL), so no term moves ``log α`` beyond the range; one outside it (a step past a bound) still
        gets the gradients that bring it back (`dynsparse.gates.functional.inward_clamp`; with ``clamp``'s zero
        gradient, a unit pushed just below the default init -8 stayed there, never pruned by the KL).
        """
        from ..gates.functional import inward_clamp

        return inward_clamp(self.log_alpha, *self.log_alpha_range)

    def forward(self) -> Tensor:
        if self.training:
            std = torch.exp(0.5 * self.clipped_log_alpha())
            return 1.0 + std * torch.randn_like(self.log_alpha)
        return self.eval_values()

    def eval_values(self) -> Tensor:
        return (self.log_alpha.detach() <= self.threshold).to(self.log_alpha.dtype)

    def keep_mask(self) -> Tensor:
        return self.log_alpha.detach() <= self.threshold

    def expected_keep(self) -> Tensor:
        """``sigmoid(−log α) = 1/(1+α)``, the keep probability of the equivalent binary dropout (differentiable).

        Of the clipped ``log α``, like the noise and the penalty: a budget cannot push ``log α`` past the range.
        """
        return torch.sigmoid(-self.clipped_log_alpha())

    def penalty(self) -> Tensor:
        """``Σ_units KL(clip(log α))`` with the sparse-VD approximation (`kl_approx`), differentiable.

        ``log α`` is clipped to ``log_alpha_range`` first, as in the reference code: beyond the upper end the KL
        is flat, so it stops pushing ``log α`` up (unclipped, its gradient never vanishes and Adam, which
        normalises gradients, drives ``log α`` up by about ``lr`` per step without bound).

        Computed in float32 at least, like `LinearSVDO.kl`: about 4.6 per unit at the default init, a float16 sum
        over more than 14,000 units (the MLP of an 8B LLM) overflowed to inf.
        """
        la = self.clipped_log_alpha()
        return kl_approx(la.to(torch.promote_types(la.dtype, torch.float32))).sum()

    @torch.no_grad()
    def constrain_(self) -> VariationalGate:
        """Clamp ``log α`` to ``log_alpha_range`` in place; returns self."""
        self.log_alpha.clamp_(*self.log_alpha_range)
        return self

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, threshold={self.threshold:g}"

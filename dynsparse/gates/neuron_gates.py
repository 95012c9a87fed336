"""Per-input (contextual) MLP neuron gates: which hidden neurons of an MLP run for this input.

Two gates, both `InputDependentGate`s over the ``H`` hidden neurons of one MLP, with ``keep`` as the run-time
knob (`dynsparse.set_budget_` changes it without retraining):

* ``cats`` (`CatsGate`, Lee et al. 2024, CATS): a threshold ``t`` on ``|act(gate pre-activation)|``; values
  under ``t`` are zero, so the up projection (SwiGLU / GLU value half) and the down projection need only the
  surviving neurons. ``t`` comes from calibration: the gate stores 1001 quantiles of ``|act|`` seen on
  calibration data (a buffer, so it saves and loads), and ``t`` is the quantile at ``1 − keep``: a fraction
  ``keep`` of the calibration activations survives, and a new ``keep`` re-derives ``t`` from the stored table.
  Training-free. Decisions are per activation, i.e. per token.
* ``dejavu`` (`DejaVuGate`, Liu et al. 2023, Deja Vu): a low-rank linear predictor ``Linear(C → r) →
  Linear(r → H)`` (no bias, no activation) scores the neurons from the MLP input; the ``keep · H`` best run.
  Both projections shrink. Trained from the dense model's activations with Deja Vu's weighted BCE
  (`dynsparse.layers.neuron_gating.train_predictors_`). Decisions per token (``per="token"``, decoding), or
  per input (``per="input"``: one set per sequence / image, scored on the mean token — exactly the mean of the
  per-token scores, since the predictor is linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, GateError
from ..modules import capturing
from ..registry import Registry
from .base import InputDependentGate

__all__ = [
    "NEURON_GATES",
    "CatsGate",
    "DejaVuGate",
    "NeuronGate",
    "active_labels",
    "fit_predictor_",
    "predictor_recall",
]

#: Registered per-input neuron gates: name -> class (constructor ``(num_units, dim=..., keep=..., **kwargs)``).
NEURON_GATES: Registry[type[NeuronGate]] = Registry("per-input neuron gate")

#: Quantile levels the CATS calibration stores (0, 0.001, ..., 1).
NUM_LEVELS = 1001


class NeuronGate(InputDependentGate):
    """Base of per-input neuron gates over ``num_units`` hidden neurons of one MLP.

    Args:
        num_units: Hidden neurons H.
        dim: Input width C of the MLP.
        keep: Fraction of neurons kept, in (0, 1].
        per: ``"token"`` (a decision per token) or ``"input"`` (one per sequence / image).

    Attributes:
        owner: Qualified name of the MLP that holds the gate (set when installed; used in error messages).
    """

    #: Decisions a gate can make: per token only, or also per input.
    pers: tuple[str, ...] = ("token", "input")

    def __init__(self, num_units: int, dim: int, keep: float = 0.5, per: str = "token") -> None:
        super().__init__(num_units, keep)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ConfigError(f"{type(self).__name__}: dim must be the MLP input width, got {dim!r}")
        if per not in self.pers:
            raise ConfigError(
                f"{type(self).__name__}: per must be one of {', '.join(map(repr, self.pers))}, got {per!r}"
            )
        self.dim, self.per, self.owner = dim, per, ""

    def where(self) -> str:
        return f"neuron gate of {self.owner!r}" if self.owner else f"{type(self).__name__}"

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, dim={self.dim}, keep={self.keep}, per={self.per!r}"


@NEURON_GATES.register("cats")
class CatsGate(NeuronGate):
    """CATS: keep the activations with ``|act| ≥ t``; ``t`` calibrated so that a fraction ``keep`` survives.

    Buffers (saved with the model): ``quantiles`` (1001,) of ``|act|`` on the calibration data (NaN until
    calibrated) and ``threshold`` (the current ``t``). ``keep = 1`` gives ``t = 0``: every neuron runs.

    Examples:
        >>> g = CatsGate(4, dim=2, keep=0.5)
        >>> g.start_calibration(); g.observe(torch.tensor([[0.1, -0.2, 0.3, -0.4]])); g.finish_calibration()
        >>> g(torch.tensor([[0.1, -0.2, 0.3, -0.4]]))
        tensor([[False, False,  True,  True]])
    """

    pers = ("token",)

    def __init__(self, num_units: int, dim: int, keep: float = 0.5, per: str = "token", max_samples: int = 1 << 22):
        super().__init__(num_units, dim, keep, per)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ConfigError(f"CatsGate: max_samples must be a positive int, got {max_samples!r}")
        self.max_samples = max_samples
        self.register_buffer("quantiles", torch.full((NUM_LEVELS,), float("nan")))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self._seen: list[tuple[Tensor, int]] | None = None  # (values, how many observed values they stand for)
        self._update_threshold()

    @property
    def calibrated(self) -> bool:
        return not bool(torch.isnan(self.quantiles).any())

    def threshold_at(self, keep: float) -> float:
        """``t`` that keeps a fraction ``keep`` of the calibration activations (linear between stored quantiles)."""
        if keep >= 1.0:
            return 0.0
        pos = (1.0 - keep) * (NUM_LEVELS - 1)
        lo = min(int(pos), NUM_LEVELS - 2)
        q = self.quantiles
        return float(q[lo] + (pos - lo) * (q[lo + 1] - q[lo]))

    def _update_threshold(self) -> None:
        # remembered for export / jit.trace, where the quantiles' values cannot be read
        self._calibrated_at_update = self.calibrated
        self.threshold.fill_(self.threshold_at(self.keep) if self.calibrated or self.keep >= 1.0 else float("nan"))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # ``threshold`` is derived from ``quantiles`` and ``keep``; the loaded one belongs to the saver's ``keep``
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            self._update_threshold()

    def set_budget_(self, keep: float) -> CatsGate:
        super().set_budget_(keep)
        self._update_threshold()
        return self

    def start_calibration(self) -> None:
        """Start collecting ``|act|`` values (`observe`); `finish_calibration` turns them into the quantile table."""
        self._seen = []

    def observe(self, act: Tensor) -> None:
        """Record activations ``act`` (..., H) (a uniform random subsample of everything observed when more than
        ``max_samples`` are seen: each batch weighs by how many values it had, however early it came)."""
        if self._seen is None:
            raise GateError(f"{self.where()}: observe() outside calibration; call start_calibration() first")
        a = act.detach().abs().flatten().float().cpu()
        self._seen.append((a, a.numel()))
        if sum(t.numel() for t, _ in self._seen) > 4 * self.max_samples:
            self._seen = [_merge(self._seen, self.max_samples)]

    def finish_calibration(self) -> None:
        """Store the quantiles of everything observed and derive ``t`` for the current ``keep``."""
        if not self._seen:
            self._seen = None
            raise GateError(f"{self.where()}: no activation was observed during calibration (is the MLP used?)")
        seen = _merge(self._seen, self.max_samples)[0]
        self._seen = None
        levels = torch.linspace(0, 1, NUM_LEVELS, dtype=torch.float64)
        self.quantiles.copy_(torch.quantile(seen.double(), levels).to(self.quantiles))
        self._update_threshold()

    def _require_calibrated(self) -> None:
        if not (getattr(self, "_calibrated_at_update", False) if capturing() else self.calibrated):
            raise GateError(
                f"{self.where()}: the cats threshold is not calibrated; run "
                "dynsparse.layers.neuron_gating.calibrate_neurons_(model, batches) before inference"
            )

    def current_threshold(self) -> float:
        """The ``t`` that `forward` applies now (``-inf`` at ``keep = 1``: every neuron); refuses when uncalibrated."""
        if self.keep >= 1.0:
            return float("-inf")
        self._require_calibrated()
        return float(self.threshold)

    def forward(self, act: Tensor) -> Tensor:
        """(..., H) bool keep mask of the activations ``act`` (..., H): ``|act| ≥ t``."""
        if self.keep >= 1.0:
            return torch.ones_like(act, dtype=torch.bool)
        self._require_calibrated()
        return act.abs() >= self.threshold.to(act.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_seen"] = None
        return state


@NEURON_GATES.register("dejavu")
class DejaVuGate(NeuronGate):
    """Deja Vu: a low-rank predictor ``Linear(C → r) → Linear(r → H)`` scores neurons; the best ``keep · H`` run.

    Args:
        num_units: Hidden neurons H.
        dim: Input width C.
        keep: Fraction of neurons kept per token (or per input).
        per: ``"token"`` or ``"input"`` (score of the mean token, one neuron set per sequence / image).
        rank: Predictor rank r (default ``max(16, C // 8)``; Deja Vu used 1000 for C = 12288).
    """

    def __init__(self, num_units: int, dim: int, keep: float = 0.5, per: str = "input", rank: int | None = None):
        super().__init__(num_units, dim, keep, per)
        rank = max(16, dim // 8) if rank is None else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"DejaVuGate: rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.predictor = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, num_units, bias=False))

    def scores(self, x: Tensor) -> Tensor:
        """(..., H) neuron logits of MLP inputs ``x`` (..., C)."""
        return self.predictor(x)

    def pool(self, x: Tensor) -> Tensor:
        """The rows the decisions are made for: ``x`` itself per token; the mean token (B, C) per input."""
        return x.mean(1) if self.per == "input" and x.dim() == 3 else x

    def top_indices(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scores (R, H) of the rows of ``pool(x)``, indices (R, k) of each row's top ``keep · H``, unsorted)."""
        s = self.scores(self.pool(x)).reshape(-1, self.num_units)
        return s, s.topk(min(self.num_kept(), self.num_units), dim=-1, sorted=False).indices

    def forward(self, x: Tensor) -> Tensor:
        """(R, H) bool keep mask: the top ``keep · H`` neurons of each row of ``pool(x)`` (R rows)."""
        s, idx = self.top_indices(x)
        if idx.shape[-1] >= self.num_units:
            return torch.ones_like(s, dtype=torch.bool)
        # a bool source, not the scalar True: torch.jit.trace cannot record scatter_ with a bool scalar
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, torch.ones_like(idx, dtype=torch.bool))

    def loss(self, x: Tensor, labels: Tensor) -> Tensor:
        """Deja Vu's weighted BCE of the predictor on rows ``x`` (R, C) with 0/1 ``labels`` (R, H).

        ``w = mean(labels) + 0.005``; positives weigh ``1 − w``, negatives ``w`` (rare positives count more).
        """
        y = labels.to(x.dtype)
        w = y.mean() + 0.005
        weight = y * (1 - w) + w
        return F.binary_cross_entropy_with_logits(self.scores(x), y, weight=weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def active_labels(a: Tensor, label: str, keep: float) -> Tensor:
    """(R, H) bool labels of the truly active neurons from ``|h|`` ``a`` (R, H): ``"topk"`` or ``"positive"``."""
    if label == "positive":
        return a > 0
    k = max(1, min(a.shape[-1], round(keep * a.shape[-1])))
    idx = a.topk(k, dim=-1).indices
    return torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, True)


def predictor_recall(gate: DejaVuGate, x: Tensor, labels: Tensor) -> float:
    """Fraction of the truly active neurons (``labels`` (R, H)) among the gate's top-k on rows ``x`` (R, C)."""
    with torch.no_grad():
        s = gate.scores(x)
        k = gate.num_kept()
        pred = torch.zeros_like(labels).scatter_(-1, s.topk(k, dim=-1).indices, True)
        return float((pred & labels).sum() / labels.sum().clamp_min(1))


def fit_predictor_(
    gate: DejaVuGate,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 1024,
    patience: int = 5,
    holdout: float = 0.05,
    seed: int = 0,
) -> float:
    """Train ``gate``'s predictor on rows ``x`` (R, C) and labels ``y`` (R, H) bool (in place).

    Deja Vu's recipe: weighted BCE (`DejaVuGate.loss`), AdamW, a held-out split, early stopping after
    ``patience`` epochs without a better held-out recall; the best epoch's weights are kept. The predictor is
    trained even where its parameters do not require grad (a model frozen whole); their flags are restored.

    Returns:
        The best held-out recall (`predictor_recall`).
    """
    p = next(gate.parameters())
    x, y = x.to(p), y.to(p.device)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g).to(p.device)
    n_val = max(1, round(holdout * len(x))) if len(x) > 1 else 0
    val, train = perm[:n_val], perm[n_val:] if n_val < len(x) else perm
    was, flags = gate.training, [(q, q.requires_grad) for q in gate.parameters()]
    gate.train().requires_grad_(True)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, bad = -1.0, None, 0
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = train[torch.randperm(len(train), generator=g).to(p.device)]
                for i in range(0, len(order), batch_size):
                    b = order[i : i + batch_size]
                    loss = gate.loss(x[b], y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                r = predictor_recall(gate, x[val], y[val])
                if r > best:
                    best, bad = r, 0
                    best_state = {k: v.detach().clone() for k, v in gate.predictor.state_dict().items()}
                else:
                    bad += 1
                    if bad >= patience:
                        break
    finally:
        gate.train(was)
        for q, flag in flags:
            q.requires_grad_(flag)
    if best_state is not None:
        gate.predictor.load_state_dict(best_state)
    return best


def _subsample(t: Tensor, n: int, g: torch.Generator | None = None) -> Tensor:
    if t.numel() <= n:
        return t
    g = torch.Generator().manual_seed(0) if g is None else g
    return t[torch.randperm(t.numel(), generator=g)[:n]]


def _merge(chunks: list[tuple[Tensor, int]], n: int) -> tuple[Tensor, int]:
    """At most ``n`` values drawn from ``chunks`` (values, how many observed values they stand for), each chunk in
    proportion to what it stands for (a subsample taken earlier stands for all it was drawn from): a uniform
    subsample of everything observed. Returns it and how many values it stands for."""
    total = sum(c for _, c in chunks)
    if total <= n:  # nothing was subsampled yet: every value, once
        return torch.cat([t for t, _ in chunks]), total
    g = torch.Generator().manual_seed(0)
    parts = [_subsample(t, min(t.numel(), round(n * c / total)), g) for t, c in chunks]
    return torch.cat(parts), total

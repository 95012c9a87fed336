"""Per-input MLP neuron selection (CATS, Deja Vu) in timm ``Mlp``, ``GluMlp`` and ``SwiGLU``.

`gate_neurons_` swaps each MLP for its twin (`NeuronGatedMlp`, `NeuronGatedGluMlp`, `NeuronGatedSwiGLU`: a
subclass sharing the host's children and parameters, plus one child ``neurons``, a gate of `NEURON_GATES`).
The hidden activation of an MLP is ``h = act(W_g x) ⊙ (W_v x)`` (``Mlp``: ``h = act(W_g x)``, ``W_g = fc1``),
then ``y = fc2(h)``. At inference the gate decides which of the H neurons run:

* ``cats`` needs ``act(W_g x)`` for every neuron (that is what it thresholds), then only the surviving rows of
  ``W_v`` and columns of ``fc2``: for ``Mlp`` only ``fc2`` shrinks, for ``SwiGLU`` / ``GluMlp`` ``W_v`` and
  ``fc2`` do. Calibrate it first with `calibrate_neurons_`.
* ``dejavu`` predicts the set from ``x``, so ``W_g``, ``W_v`` and ``fc2`` all shrink. Train its predictor
  first with `train_predictors_` (the host stays frozen).

How a decision becomes less work (``module.strategy``, ``"auto"`` by default):

* ``"gather"``: rows sharing one neuron set (one token, or the tokens of one image with ``per="input"``) run
  with the gathered weight rows / columns; a batch of sets loops over them.
* ``"union"``: one gather of the union of the sets of the batch, each row masked inside it (exact).
* ``"mask"``: the dense MLP with the dropped activations zeroed (the reference; no gain).
* ``"auto"``: ``gather`` for one set or for per-input sets of ≥ 8 tokens; otherwise (decoding several single
  tokens) ``union`` when the union keeps ≤ 70 % of the neurons, else ``mask``. For a single token it uses the
  single-row kernels of `dynsparse.layers.neuron_kernels` (measured in ``benchmarks/dynamic_neurons.py``).

All strategies give the same output for the same decisions (tested); in training the masked path runs. An input
with no row (an empty batch) runs the host's own forward. The producers (``fc1``, ``fc1_g``, ``fc1_x``) are read as
``weight`` / ``bias`` on every path, ``fc2`` on the gathered ones: hooks on them do not run there, and a wrapper
that adds to them (LoRA) is left out.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..errors import ConfigError, UnsupportedModuleError
from ..gates.neuron_gates import NEURON_GATES, CatsGate, DejaVuGate, NeuronGate, active_labels
from ..modules import adopt, capturing, place_like, replace_module_
from ..sparsify import _patterns, _selected
from .neuron_kernels import consumer_row, kernel_cats, kernel_row, linear_rows, producer_row, transposed
from .predictors import check_fit_options, dense_pass, fit_all
from .token_pack import check_not_packed

__all__ = [
    "NEURON_GATES",
    "NeuronGatedGluMlp",
    "NeuronGatedMlp",
    "NeuronGatedSwiGLU",
    "calibrate_neurons_",
    "gate_neurons_",
    "neuron_spec",
    "set_strategy_",
    "train_predictors_",
]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "gather", "union", "mask")
#: ``auto``: union of several single-token sets only when it keeps at most this fraction of the neurons.
UNION_MAX = 0.7
#: ``auto``: per-input groups of at least this many tokens run one gathered matmul each.
MIN_GROUP_ROWS = 8


class NeuronGated:
    """Mixin of the per-input neuron-gated twins of timm MLPs (see the module doc)."""

    host_class: ClassVar[type[nn.Module]]
    neurons: NeuronGate
    strategy: str

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if not isinstance(host.norm, nn.Identity):
            return f"its hidden norm ({type(host.norm).__name__}) normalises over all hidden units"
        if not isinstance(host.fc2, nn.Linear):
            return "it is a convolutional MLP (use_conv=True); only Linear MLPs are supported"
        return None

    @classmethod
    def from_module(cls, host: nn.Module, gate: NeuronGate, fqn: str = "") -> NeuronGated:
        """A twin of ``host`` sharing its children and parameters, with ``gate`` as child ``neurons``."""
        if type(host) is not cls.host_class:
            raise UnsupportedModuleError(
                fqn, type(host).__name__, "neurons", f"{cls.__name__} wraps only a timm {cls.host_class.__name__}"
            )
        reason = cls.unsupported_reason(host)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(host).__name__, "neurons", reason)
        new = adopt(host, cls)
        new._modules = dict(new._modules)
        new.neurons = place_like(gate, host)
        new.strategy, new._record = "auto", None
        new._w2t = new._w2t_src = new._packed = new._packed_src = None
        gate.owner = fqn
        return new

    def train(self, mode: bool = True) -> NeuronGated:
        """As `nn.Module.train`; also drops the weight caches, which a fused optimizer's step (it does not bump the
        weights' versions) would otherwise leave stale for the next eval pass."""
        self._w2t = self._w2t_src = self._packed = self._packed_src = None
        return super().train(mode)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the weight caches out (rebuilt on first use); they are derived data."""
        state = dict(super().__getstate__())
        state.update(_w2t=None, _w2t_src=None, _packed=None, _packed_src=None)
        return state

    # -- the host's weights, in the common form h = act(W_g x + b_g) * (W_v x + b_v) -------------------------
    def _producers(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def gate_activation(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        """``act(W_g x + b_g)`` (n, H) of rows ``x`` (n, C), neurons ``idx`` only when given (what cats thresholds)."""
        w, b, _, _ = self._producers()
        return self.act(linear_rows(x, w, b, idx))

    def _hidden(self, x: Tensor, g: Tensor, idx: Tensor | None = None) -> Tensor:
        _, _, wv, bv = self._producers()
        return g if wv is None else g * linear_rows(x, wv, bv, idx)

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        gate = self.neurons
        rows = x.reshape(-1, x.shape[-1])
        if not len(rows):
            return self.host_class.forward(self, x)  # no row, nothing to decide: the host's own forward
        n = x.shape[1] if gate.per == "input" and x.dim() == 3 else 1  # rows per decision
        capture = capturing()  # export / jit.trace: the masked path (a graph cannot hold a data-dependent width)
        if isinstance(gate, CatsGate) and self._record is None and not (self.training or capture) and len(rows) == 1:
            y = kernel_cats(self, rows)  # one token: the compiled kernel thresholds and runs the kept neurons
            if y is not None:
                return self.drop2(y).reshape(*x.shape[:-1], y.shape[-1])
        g = None
        if self._record is not None or isinstance(gate, CatsGate):
            g = self.gate_activation(rows)
        if self._record is not None:
            h = self._hidden(rows, g)
            self._record(self, x, rows, g, h)
            y = self.drop2(self.fc2(self.drop1(h)))
        else:
            keep = gate(g) if isinstance(gate, CatsGate) else gate(x)
            y = self._masked(rows, g, keep, n) if self.training or capture else self._sparse(rows, g, keep, n)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _masked(self, rows: Tensor, g: Tensor | None, keep: Tensor, n: int) -> Tensor:
        if g is None:
            g = self.gate_activation(rows)
        m = keep.repeat_interleave(n, 0) if n > 1 else keep
        h = self.drop1(self._hidden(rows, g)) * m.to(g.dtype)
        return self.drop2(self.fc2(h))

    def _sparse(self, rows: Tensor, g: Tensor | None, keep: Tensor, n: int) -> Tensor:
        groups, strategy = keep.shape[0], self.strategy
        if strategy == "auto":
            if groups == 1 or n >= MIN_GROUP_ROWS:
                strategy = "gather"
            else:
                strategy = "union" if float(keep.any(0).float().mean()) <= UNION_MAX else "mask"
        if strategy == "mask":
            return self._masked(rows, g, keep, n)
        if strategy == "union":
            idx = keep.any(0).nonzero().squeeze(1)
            m = keep.index_select(1, idx)
            return self._run(rows, g, idx, m.repeat_interleave(n, 0) if n > 1 else m)
        if groups == 1:
            return self._run(rows, g, keep[0].nonzero().squeeze(1), None)
        out = []
        for i in range(groups):
            sl = slice(i * n, (i + 1) * n)
            out.append(self._run(rows[sl], None if g is None else g[sl], keep[i].nonzero().squeeze(1), None))
        return torch.cat(out)

    def _run(self, rows: Tensor, g: Tensor | None, idx: Tensor, m: Tensor | None) -> Tensor:
        """The MLP on ``rows`` (n, C) with only neurons ``idx`` (sorted); ``m`` (n, len(idx)) masks inside them."""
        # one token: the fastest single-row kernels; not under a dispatch mode (a FLOP counter), where they step
        # aside for PyTorch fallbacks it would misread (a dense producer then sliced, an uncounted embedding_bag),
        # nor under autocast (embedding_bag and the kernels do not follow it: mixed dtypes, float32 results)
        one = self.strategy == "auto" and rows.shape[0] == 1 and not is_in_torch_dispatch_mode()
        one = one and not torch.is_autocast_enabled(rows.device.type)
        wg, bg, wv, bv = self._producers()
        if one and m is None and idx.numel():
            y = kernel_row(self, rows, g, idx)
            if y is not None:
                return self.drop2(y)
        if g is not None:
            g = g.index_select(1, idx)
        else:
            g = self.act(producer_row(rows, wg, bg, idx) if one else linear_rows(rows, wg, bg, idx))
        if wv is not None:
            g = g * (producer_row(rows, wv, bv, idx) if one else linear_rows(rows, wv, bv, idx))
        h = self.drop1(g)
        if m is not None:
            h = h * m.to(h.dtype)
        b, w_t = self.fc2.bias, transposed(self, self.fc2.weight)
        if idx.numel() == 0:
            y = rows.new_zeros(rows.shape[0], self.fc2.out_features) + (0 if b is None else b)
        elif one:
            y = consumer_row(h, idx, w_t, b)
        else:
            w = w_t.index_select(0, idx)
            y = h @ w if b is None else torch.addmm(b, h, w)
        return self.drop2(y)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}"


class NeuronGatedMlp(NeuronGated, Mlp):
    """timm ``Mlp`` with a per-input neuron gate ``neurons`` on ``act(fc1(x))``."""

    host_class = Mlp

    def _producers(self):
        return self.fc1.weight, self.fc1.bias, None, None


class NeuronGatedSwiGLU(NeuronGated, SwiGLU):
    """timm ``SwiGLU`` with a per-input neuron gate ``neurons`` on ``act(fc1_g(x)) * fc1_x(x)``."""

    host_class = SwiGLU

    def _producers(self):
        return self.fc1_g.weight, self.fc1_g.bias, self.fc1_x.weight, self.fc1_x.bias


class NeuronGatedGluMlp(NeuronGated, GluMlp):
    """timm ``GluMlp`` with a per-input neuron gate ``neurons`` on the gated product (halves of ``fc1``)."""

    host_class = GluMlp

    def _producers(self):
        w, b, h = self.fc1.weight, self.fc1.bias, self.fc2.in_features
        gate, value = (slice(h, None), slice(0, h)) if self.gate_last else (slice(0, h), slice(h, None))
        return w[gate], None if b is None else b[gate], w[value], None if b is None else b[value]


#: host class -> twin
TWINS: dict[type[nn.Module], type[NeuronGated]] = {
    Mlp: NeuronGatedMlp,
    GluMlp: NeuronGatedGluMlp,
    SwiGLU: NeuronGatedSwiGLU,
}


def _targets(
    model: nn.Module, modules: Sequence[str] | None, include: Sequence[str] | str | None, exclude
) -> list[tuple[str, nn.Module]]:
    inc, exc = _patterns(include, "neurons.include"), _patterns(exclude, "neurons.exclude")
    named = dict(model.named_modules())
    if modules is not None:
        missing = [f for f in modules if f not in named]
        if missing:
            raise ConfigError(f"neurons.modules: the model has no module {missing[0]!r}")
        found = [(f, named[f]) for f in modules]
        bad = [(f, m) for f, m in found if type(m) not in TWINS]
        if bad:
            f, m = bad[0]
            raise UnsupportedModuleError(f, type(m).__name__, "neurons", "not a timm Mlp, GluMlp or SwiGLU")
        return [(f, m) for f, m in found if _selected(f, inc, exc)]
    return [(f, m) for f, m in named.items() if type(m) in TWINS and f and _selected(f, inc, exc)]


def gate_neurons_(
    model: nn.Module,
    gate: str = "cats",
    keep: float | Mapping[str, float] = 0.5,
    *,
    modules: Sequence[str] | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    **gate_kwargs: Any,
) -> nn.Module:
    """Give the timm MLPs of ``model`` a per-input neuron gate (in place); returns ``model``.

    Args:
        model: A model holding timm ``Mlp`` / ``GluMlp`` / ``SwiGLU`` modules (exact types, Linear layers).
        gate: A name of `NEURON_GATES`: ``"cats"`` or ``"dejavu"``.
        keep: Fraction of neurons kept, in (0, 1], or ``{mlp_fqn: keep}``.
        modules: Exact fqns of the MLPs to gate (default: every MLP); ``include`` / ``exclude`` filter them.
        include: fqn glob patterns; only matching MLPs are gated.
        exclude: fqn glob patterns; matching MLPs are not gated.
        **gate_kwargs: Gate options: ``per`` (``"token"`` / ``"input"``), ``rank`` (``dejavu``), ``max_samples``
            (``cats``).

    Raises:
        ConfigError: unknown gate (with suggestions), bad ``keep`` or gate option.
        UnsupportedModuleError: no MLP to gate, or a listed MLP that cannot be gated (names its fqn).

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = timm.create_model("test_vit")
        >>> _ = ds.sparsify_(m, {"neurons": {"gate": "dejavu", "keep": 0.5}})
        >>> type(m.blocks[0].mlp).__name__, m.blocks[0].mlp.neurons.keep
        ('NeuronGatedMlp', 0.5)
    """
    cls = NEURON_GATES.get(gate)
    found = _targets(model, modules, include, exclude)
    if not found:
        already = any(isinstance(m, NeuronGated) for m in model.modules())
        raise UnsupportedModuleError(
            "",
            type(model).__name__,
            "neurons",
            "its MLPs already have per-input neuron gates"
            if already
            else "no timm Mlp, GluMlp or SwiGLU found (check include / exclude)",
        )
    default_per = inspect.signature(cls).parameters.get("per")
    per = gate_kwargs.get("per", default_per.default if default_per is not None else None)
    if per == "input":  # given, or the gate's default (dejavu decides per input unless told otherwise)
        check_not_packed(model, found)
    keeps = dict(keep) if isinstance(keep, Mapping) else {f: keep for f, _ in found}
    unknown = sorted(set(keeps) - {f for f, _ in found})
    if unknown:
        raise ConfigError(f"neurons.keep: {unknown[0]!r} is not one of the gated MLPs")
    built = []
    for fqn, host in found:
        twin = TWINS[type(host)]
        reason = twin.unsupported_reason(host)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(host).__name__, "neurons", reason)
        hidden = host.fc2.in_features
        dim = (host.fc1_g if isinstance(host, SwiGLU) else host.fc1).in_features
        try:
            g = cls(hidden, dim=dim, keep=keeps.get(fqn, 1.0), **gate_kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"neurons gate {gate!r}: {e}") from None
        built.append((fqn, twin.from_module(host, g, fqn=fqn)))
    for fqn, new in built:
        replace_module_(model, fqn, new)
    return model


def neuron_spec(model: nn.Module) -> dict | None:
    """The `gate_neurons_` arguments that rebuild ``model``'s per-input neuron gates, or None."""
    found = [(f, m.neurons) for f, m in model.named_modules() if isinstance(m, NeuronGated)]
    if not found:
        return None
    g0 = found[0][1]
    kinds = {(type(g), g.per, getattr(g, "rank", None)) for _, g in found}
    if len(kinds) > 1:
        raise ConfigError("neurons: per-input neuron gates of different kinds or settings cannot be saved in one plan")
    keeps = {f: g.keep for f, g in found}
    spec: dict[str, Any] = {
        "gate": next(n for n in NEURON_GATES.names() if NEURON_GATES.get(n) is type(g0)),
        "modules": [f for f, _ in found],
        "keep": g0.keep if len(set(keeps.values())) == 1 else keeps,
        "per": g0.per,
    }
    if isinstance(g0, DejaVuGate):
        spec["rank"] = g0.rank
    return spec


def set_strategy_(model: nn.Module, strategy: str = "auto") -> nn.Module:
    """Set how every neuron-gated MLP turns decisions into less work (in place); returns ``model``.

    Args:
        model: A model with per-input neuron gates.
        strategy: ``"auto"``, ``"gather"``, ``"union"`` or ``"mask"`` (see the module doc).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    mlps = [m for m in model.modules() if isinstance(m, NeuronGated)]
    if not mlps:
        raise ConfigError(f"set_strategy_: {type(model).__name__} has no per-input neuron gate")
    for m in mlps:
        m.strategy = strategy
    return model


def _first(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _dense_pass(model: nn.Module, batches: Iterable, record, max_batches: int | None) -> int:
    """`dense_pass` over every neuron-gated MLP, per-input head gates at keep 1."""
    from ..gates.head_gates import DejaVuHeadGate

    mlps = [m for m in model.modules() if isinstance(m, NeuronGated)]
    if not mlps:
        raise ConfigError(f"{type(model).__name__} has no per-input neuron gate")
    return dense_pass(model, mlps, record, batches, max_batches, others=DejaVuHeadGate, owner="neuron calibration")


def calibrate_neurons_(model: nn.Module, batches: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Calibrate every ``cats`` threshold of ``model`` on ``batches`` (dense runs, in place); returns ``model``.

    Args:
        model: A model with ``cats`` neuron gates.
        batches: Input tensors, or ``(inputs, labels)`` pairs (a DataLoader; moved to the model's device).
        max_batches: Use at most this many batches.
    """
    gates = [m.neurons for m in model.modules() if isinstance(m, NeuronGated) and isinstance(m.neurons, CatsGate)]
    if not gates:
        raise ConfigError(f"calibrate_neurons_: {type(model).__name__} has no cats neuron gate")
    for g in gates:
        g.start_calibration()

    def record(mlp, x, rows, g, h):
        if isinstance(mlp.neurons, CatsGate):
            mlp.neurons.observe(g)

    try:
        _dense_pass(model, batches, record, max_batches)
    except BaseException:
        for g in gates:
            g._seen = None
        raise
    for g in gates:
        g.finish_calibration()
    return model


def train_predictors_(
    model: nn.Module,
    batches: Iterable,
    *,
    label: str = "topk",
    label_keep: float | None = None,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 1024,
    patience: int = 5,
    holdout: float = 0.05,
    max_rows: int = 16384,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train every ``dejavu`` predictor of ``model`` from its dense activations (Deja Vu's recipe; host frozen).

    One dense pass over ``batches`` records, per gated MLP, the predictor's rows (tokens, or the mean token of
    each input with ``per="input"``) and labels from the dense hidden activation ``|h|``; then each predictor
    is trained with the weighted BCE of `DejaVuGate.loss`, AdamW, a 95/5 split and early stopping on the
    held-out recall; the best epoch is kept.

    Args:
        model: A model with ``dejavu`` neuron gates. Only the predictors change.
        batches: Input tensors, or ``(inputs, labels)`` pairs (moved to the model's device).
        label: ``"topk"`` (the ``label_keep · H`` largest ``|h|`` per row) or ``"positive"`` (``h ≠ 0``, for
            ReLU MLPs; per input: nonzero on some token).
        label_keep: Fraction labelled active for ``"topk"`` (default: each gate's ``keep``).
        epochs: Most epochs per predictor.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Rows per step.
        patience: Stop after this many epochs without a better held-out recall.
        holdout: Fraction of rows held out.
        max_rows: Most rows recorded per MLP.
        max_batches: Use at most this many batches.
        seed: Seed of the split and the row order.

    Returns:
        ``{mlp_fqn: held-out recall}``: the fraction of the truly active neurons among the predicted top
        ``keep · H`` (chance level is ``keep`` for ``"topk"`` labels at ``label_keep = keep``).
    """
    if label not in ("topk", "positive"):
        raise ConfigError(f"train_predictors_: label must be 'topk' or 'positive', got {label!r}")
    sizes = dict(epochs=epochs, batch_size=batch_size, max_rows=max_rows, holdout=holdout)
    check_fit_options("train_predictors_", label_keep=label_keep, **sizes)
    named = {m: f for f, m in model.named_modules() if isinstance(m, NeuronGated) and isinstance(m.neurons, DejaVuGate)}
    if not named:
        raise ConfigError(f"train_predictors_: {type(model).__name__} has no dejavu neuron gate")
    data: dict[nn.Module, list[list[Tensor]]] = {m: [[], []] for m in named}

    keeps = {mlp: mlp.neurons.keep if label_keep is None else label_keep for mlp in named}  # before the dense pass

    def record(mlp, x, rows, g, h):
        if mlp not in data or sum(len(t) for t in data[mlp][0]) >= max_rows:
            return
        gate, a = mlp.neurons, h.abs()
        if gate.per == "input" and x.dim() == 3:
            rows, a = x.mean(1), a.reshape(*x.shape[:2], -1).mean(1)
        data[mlp][0].append(rows.detach().cpu())
        data[mlp][1].append(active_labels(a, label, keeps[mlp]).cpu())

    _dense_pass(model, batches, record, max_batches)
    fit = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, patience=patience)
    found = {named[mlp]: (mlp.neurons, xs, ys) for mlp, (xs, ys) in data.items()}
    return fit_all(found, max_rows, "neuron", **fit, holdout=holdout, seed=seed)

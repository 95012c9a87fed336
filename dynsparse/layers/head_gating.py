"""Per-input attention-head selection (Deja Vu's head predictor) in timm ``Attention``.

`gate_heads_` swaps each timm ``Attention`` for `HeadGatedAttention`: the same class with the same children and
parameters, plus one child ``heads``, a gate of `HEAD_GATES` that picks the heads each input runs
(``ds.sparsify_(model, {"heads": {"gate": "dejavu", "keep": 0.5}})`` routes here). Train the predictors from the
dense model with `train_head_predictors_` (the host stays frozen); ``keep`` is the run-time knob.

At inference a head that an input does not keep costs nothing for that input: its rows of ``qkv`` (query, key and
value), its attention and its columns of ``proj`` are left out (``q_norm`` / ``k_norm`` work per head; timm's
optional output ``gate`` is sliced like ``proj``'s input). Every input keeps the same number of heads, so how a
batch runs (``strategy``):

* ``"auto"`` (default) / ``"group"``: one gathered run per group of inputs with the same heads (a batch where every
  input chose the same heads is one run);
* ``"mask"``: the dense attention with the dropped heads' outputs zeroed (the reference; no gain).

Both give the same output for the same decisions (tested). Training, ``torch.export`` and ``jit.trace`` run the
masked path. The gathered runs read the ``weight`` / ``bias`` of ``qkv``, ``gate`` and ``proj`` directly: hooks on
those children do not run there, and a wrapper that adds to them (LoRA) is left out; use ``strategy="mask"``.
Where a model packs several inputs into one sequence (a threshold token gate) or runs the attention
inside a token gate's own paths, per-input heads are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModuleError
from ..gates.head_gates import HEAD_GATES, DejaVuHeadGate, head_labels
from ..modules import adopt, capturing, place_like, replace_module_
from ..sparsify import _patterns, _selected
from .neuron_kernels import transposed
from .predictors import check_fit_options, dense_pass, fit_all

__all__ = [
    "HEAD_GATES",
    "HeadGatedAttention",
    "gate_heads_",
    "head_norms",
    "head_spec",
    "set_head_strategy_",
    "train_head_predictors_",
]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "group", "mask")


class HeadGatedAttention(Attention):
    """timm ``Attention`` whose heads are chosen per input by the gate ``heads`` (see the module doc).

    Examples:
        >>> import torch, timm.layers
        >>> host = timm.layers.Attention(32, num_heads=4)
        >>> m = HeadGatedAttention.from_module(host, DejaVuHeadGate(4, dim=32, keep=0.5)).eval()
        >>> x = torch.randn(3, 7, 32)
        >>> m.strategy = "mask"; ref = m(x); m.strategy = "auto"
        >>> torch.allclose(m(x), ref, atol=1e-6)
        True
    """

    #: The class the integration tables know it as (`dynsparse.integrations.tables.host_type`): static ``heads``
    #: gates on it are refused as "already gated", its block's ``layers`` gates work as on a plain Attention's.
    host_class: ClassVar[type[nn.Module]] = Attention
    heads: DejaVuHeadGate
    strategy: str

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if not isinstance(host.norm, nn.Identity):
            return "scale_norm normalises over all heads, so leaving a head out is not exact"
        return None

    @classmethod
    def from_module(cls, host: nn.Module, gate: DejaVuHeadGate, fqn: str = "") -> HeadGatedAttention:
        """A twin of ``host`` sharing its children and parameters, with ``gate`` as child ``heads``."""
        if type(host) is not Attention:
            raise UnsupportedModuleError(fqn, type(host).__name__, "heads", "per-input heads need a timm Attention")
        reason = cls.unsupported_reason(host)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(host).__name__, "heads", reason)
        if gate.num_units != host.num_heads:
            raise ConfigError(
                f"heads: the gate of {fqn!r} decides over {gate.num_units} heads, the layer has {host.num_heads}"
            )
        new = adopt(host, cls)
        new.heads = place_like(gate, host)
        new.strategy, new._record = "auto", None
        new._w2t = new._w2t_src = None
        gate.owner = fqn
        return new

    def __getstate__(self) -> dict:
        """Copies and pickles leave the transposed ``proj`` weight out (rebuilt on first use)."""
        state = dict(super().__getstate__())
        state.update(_w2t=None, _w2t_src=None, _record=None)
        return state

    def train(self, mode: bool = True) -> HeadGatedAttention:
        """As `nn.Module.train`; also drops the transposed ``proj`` weight, which a fused optimizer's step (it
        does not bump the weight's version) would otherwise leave stale for the next eval pass."""
        self._w2t = self._w2t_src = None
        return super().train(mode)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if self._record is not None:  # a dense pass recording each head's output (predictor training)
            y, o = self._masked(x, attn_mask, is_causal, None)
            self._record(self, x, o)
            return y
        if self.training or capturing() or self.strategy == "mask":
            return self._masked(x, attn_mask, is_causal, self.heads(x))[0]
        if self.heads.num_kept() >= self.num_heads or not x.numel():  # every head, or an empty batch
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        idx = self.heads.top_indices(x)[1]  # the heads the gate's (B, H) mask keeps, as indices (B, k)
        return self._grouped(x, attn_mask, is_causal, idx.sort(dim=-1).values)

    # -- the attention of the heads ``heads`` only --------------------------------------------------------------
    def _core(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """timm's attention of (B, h, N, d) queries, keys and values (fused or not, as the host)."""
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        a = (q * self.scale) @ k.transpose(-2, -1)
        a = maybe_add_mask(a, resolve_self_attn_mask(q.shape[-2], a, attn_mask, is_causal))
        return self.attn_drop(a.softmax(dim=-1)) @ v

    def _masked(
        self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, keep: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Every head computed, the outputs of heads not in ``keep`` (B, H) zeroed; also the heads' outputs."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = self._core(self.q_norm(q), self.k_norm(k), v, attn_mask, is_causal)  # (B, H, N, d)
        y = o if keep is None else o * keep[:, :, None, None].to(o.dtype)
        y = y.transpose(1, 2).reshape(B, N, self.attn_dim)
        if gate is not None:
            y = y * gate
        return self.proj_drop(self.proj(y)), o

    def _gathered(self, x: Tensor, heads: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """The layer on ``x`` (b, N, C) with the heads ``heads`` (sorted indices) only."""
        B, N, _ = x.shape
        h, d = heads.numel(), self.head_dim
        # (3, H, d): the qkv rows of each head's query, key and value; [0] is also its channels of the output
        table = torch.arange(3 * self.attn_dim, device=x.device).view(3, self.num_heads, d)
        elems, rows = table[0].index_select(0, heads).flatten(), table.index_select(1, heads).flatten()
        b = self.qkv.bias
        qkv = F.linear(x, self.qkv.weight.index_select(0, rows), None if b is None else b.index_select(0, rows))
        q, k, v = qkv.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = self._core(self.q_norm(q), self.k_norm(k), v, _mask_heads(attn_mask, heads, self.num_heads), is_causal)
        o = o.transpose(1, 2).reshape(B, N, h * d)
        if self.gate is not None:
            gb = self.gate.bias
            g = F.linear(x, self.gate.weight.index_select(0, elems), None if gb is None else gb.index_select(0, elems))
            o = o * g.sigmoid()
        w = transposed(self, self.proj.weight).index_select(0, elems)  # (h d, C_out): contiguous rows per head
        pb = self.proj.bias
        y = (o @ w) if pb is None else torch.addmm(pb, o.reshape(-1, h * d), w).reshape(B, N, -1)
        return self.proj_drop(y)

    def _grouped(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool, idx: Tensor) -> Tensor:
        """One gathered run per group of inputs with the same heads (``idx`` (B, k): sorted head indices per input),
        written into one output."""
        if x.shape[0] == 1:
            return self._gathered(x, idx[0], attn_mask, is_causal)
        uniq, inv = torch.unique(idx, dim=0, return_inverse=True)
        if len(uniq) == 1:
            return self._gathered(x, uniq[0], attn_mask, is_causal)
        out = None
        for g in range(len(uniq)):
            rows = (inv == g).nonzero().squeeze(1)
            mask = _mask_rows(attn_mask, rows, x.shape[0])
            part = self._gathered(x.index_select(0, rows), uniq[g], mask, is_causal)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        return out

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}"


def _mask_heads(mask: Tensor | None, heads: Tensor, num_heads: int) -> Tensor | None:
    """An attention mask with a head dimension ((B,) H, N, N) cut to ``heads``; broadcast masks as they are."""
    if mask is None or mask.dim() < 3 or mask.shape[-3] != num_heads or num_heads == 1:
        return mask
    return mask.index_select(mask.dim() - 3, heads)


def _mask_rows(mask: Tensor | None, rows: Tensor, batch: int) -> Tensor | None:
    """An attention mask with one entry per input (B, …, N, N) cut to the inputs ``rows``."""
    if mask is None or mask.dim() < 4 or mask.shape[0] != batch or batch == 1:
        return mask
    return mask.index_select(0, rows)


def _targets(
    model: nn.Module, modules: Sequence[str] | None, include: Sequence[str] | str | None, exclude
) -> list[tuple[str, nn.Module]]:
    inc, exc = _patterns(include, "heads.include"), _patterns(exclude, "heads.exclude")
    named = dict(model.named_modules())
    if modules is not None:
        missing = [f for f in modules if f not in named]
        if missing:
            raise ConfigError(f"heads.modules: the model has no module {missing[0]!r}")
        found = [(f, named[f]) for f in modules]
        bad = [(f, m) for f, m in found if type(m) is not Attention]
        if bad:
            f, m = bad[0]
            raise UnsupportedModuleError(f, type(m).__name__, "heads", "not a timm Attention")
        return [(f, m) for f, m in found if _selected(f, inc, exc)]
    return [(f, m) for f, m in named.items() if type(m) is Attention and f and _selected(f, inc, exc)]


def _check_no_token_gates(model: nn.Module) -> None:
    """Token-aware blocks run their attention on their own paths (policy masks, packed sequences): refused."""
    from .tokens import _TokenAware

    for f, m in model.named_modules():
        if isinstance(m, _TokenAware):
            raise UnsupportedModuleError(
                f, type(m).__name__, "heads", "per-input heads cannot be combined with token gates yet"
            )


def gate_heads_(
    model: nn.Module,
    gate: str = "dejavu",
    keep: float | Mapping[str, float] = 0.5,
    *,
    modules: Sequence[str] | None = None,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    strategy: str = "auto",
    **gate_kwargs: Any,
) -> nn.Module:
    """Give the timm ``Attention`` layers of ``model`` a per-input head gate (in place); returns ``model``.

    Args:
        model: A model holding timm ``Attention`` modules (exact type: ViT, DeiT, ...).
        gate: A name of `HEAD_GATES` (``"dejavu"``).
        keep: Fraction of heads kept per input, in (0, 1], or ``{attention_fqn: keep}``.
        modules: Exact fqns of the attention layers to gate (default: every one); ``include`` / ``exclude``
            filter them.
        include: fqn glob patterns; only matching layers are gated.
        exclude: fqn glob patterns; matching layers are not gated.
        strategy: How eval batches run (``"auto"``, ``"group"``, ``"mask"``; see the module doc).
        **gate_kwargs: Gate options (``rank``).

    Raises:
        ConfigError: unknown gate (with suggestions), bad ``keep`` or gate option.
        UnsupportedModuleError: no layer to gate, a listed layer that cannot be gated, or token gates in the model.

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = timm.create_model("test_vit")
        >>> _ = ds.sparsify_(m, {"heads": {"gate": "dejavu", "keep": 0.5}})
        >>> type(m.blocks[0].attn).__name__, m.blocks[0].attn.heads.num_kept()
        ('HeadGatedAttention', 1)
    """
    cls = HEAD_GATES.get(gate)
    if strategy not in STRATEGIES:
        raise ConfigError(f"heads.strategy: one of {', '.join(STRATEGIES)} expected, got {strategy!r}")
    found = _targets(model, modules, include, exclude)
    if not found:
        already = any(isinstance(m, HeadGatedAttention) for m in model.modules())
        raise UnsupportedModuleError(
            "",
            type(model).__name__,
            "heads",
            "its attention layers already have per-input head gates"
            if already
            else "no timm Attention found (check include / exclude)",
        )
    _check_no_token_gates(model)
    keeps = dict(keep) if isinstance(keep, Mapping) else {f: keep for f, _ in found}
    unknown = sorted(set(keeps) - {f for f, _ in found})
    if unknown:
        raise ConfigError(f"heads.keep: {unknown[0]!r} is not one of the gated attention layers")
    built = []
    for fqn, host in found:
        reason = HeadGatedAttention.unsupported_reason(host)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(host).__name__, "heads", reason)
        try:
            g = cls(host.num_heads, dim=host.qkv.in_features, keep=keeps.get(fqn, 1.0), **gate_kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"heads gate {gate!r}: {e}") from None
        built.append((fqn, HeadGatedAttention.from_module(host, g, fqn=fqn)))
    for fqn, new in built:
        new.strategy = strategy
        replace_module_(model, fqn, new)
    return model


def head_spec(model: nn.Module) -> dict | None:
    """The `gate_heads_` arguments that rebuild ``model``'s per-input head gates, or None."""
    found = [(f, m.heads) for f, m in model.named_modules() if isinstance(m, HeadGatedAttention)]
    if not found:
        return None
    g0 = found[0][1]
    kinds = {(type(g), g.rank) for _, g in found}
    strategies = {m.strategy for m in model.modules() if isinstance(m, HeadGatedAttention)}
    if len(kinds) > 1 or len(strategies) > 1:
        raise ConfigError("heads: per-input head gates of different kinds or settings cannot be saved in one plan")
    keeps = {f: g.keep for f, g in found}
    return {
        "gate": next(n for n in HEAD_GATES.names() if HEAD_GATES.get(n) is type(g0)),
        "modules": [f for f, _ in found],
        "keep": g0.keep if len(set(keeps.values())) == 1 else keeps,
        "rank": g0.rank,
        "strategy": strategies.pop(),
    }


def set_head_strategy_(model: nn.Module, strategy: str = "auto") -> nn.Module:
    """Set how every head-gated attention layer runs a batch (``"auto"``, ``"group"``, ``"mask"``); returns it."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"heads.strategy: one of {', '.join(STRATEGIES)} expected, got {strategy!r}")
    layers = [m for m in model.modules() if isinstance(m, HeadGatedAttention)]
    if not layers:
        raise ConfigError(f"set_head_strategy_: {type(model).__name__} has no per-input head gate")
    for m in layers:
        m.strategy = strategy
    return model


def train_head_predictors_(
    model: nn.Module,
    batches: Iterable,
    *,
    label: str = "norm",
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
    """Train every head predictor of ``model`` from its dense attention (Deja Vu's recipe; host frozen).

    One dense pass over ``batches`` records, per gated layer and input, the mean token of the layer's input and
    the mean over tokens of each head's output norm; the labels are the top ``label_keep · H`` heads by that norm
    (`dynsparse.gates.head_gates.head_labels`). ``label="contribution"`` ranks the heads by the norm of what they
    add to the residual stream instead (each head's output through its columns of ``proj``). Each predictor is then
    fit like Deja Vu's (`dynsparse.gates.neuron_gates.fit_predictor_`: weighted BCE, AdamW, a held-out split, early
    stopping on the held-out recall; the best epoch is kept).

    Args:
        model: A model with per-input head gates. Only the predictors change.
        batches: Input tensors, or ``(inputs, labels)`` pairs (moved to the model's device).
        label: ``"norm"`` (Deja Vu: each head's attention output ``‖softmax(q kᵀ / √d) v‖``) or
            ``"contribution"`` (``‖W_proj[:, head] · o_head‖``, after timm's output gate where the layer has one).
        label_keep: Fraction of heads labelled active (default: each gate's ``keep``).
        epochs: Most epochs per predictor.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Rows (inputs) per step.
        patience: Stop after this many epochs without a better held-out recall.
        holdout: Fraction of rows held out.
        max_rows: Most inputs recorded per layer.
        max_batches: Use at most this many batches.
        seed: Seed of the split and the row order.

    Returns:
        ``{attention_fqn: held-out recall}``: the fraction of the labelled heads among the predicted top
        ``keep · H`` (chance level is ``keep`` when ``label_keep = keep``).
    """
    named = {m: f for f, m in model.named_modules() if isinstance(m, HeadGatedAttention)}
    if not named:
        raise ConfigError(f"train_head_predictors_: {type(model).__name__} has no per-input head gate")
    if label not in ("norm", "contribution"):
        raise ConfigError(f"train_head_predictors_: label must be 'norm' or 'contribution', got {label!r}")
    sizes = dict(epochs=epochs, batch_size=batch_size, max_rows=max_rows, holdout=holdout)
    check_fit_options("train_head_predictors_", label_keep=label_keep, **sizes)
    data: dict[nn.Module, list[list[Tensor]]] = {m: [[], []] for m in named}

    keeps = {attn: attn.heads.keep if label_keep is None else label_keep for attn in named}  # before the dense pass

    def record(attn: HeadGatedAttention, x: Tensor, o: Tensor) -> None:
        if sum(len(t) for t in data[attn][0]) >= max_rows:
            return
        norms = head_norms(attn, o, label, x)
        data[attn][0].append(x.mean(1).detach().cpu())
        data[attn][1].append(head_labels(norms, keeps[attn]).cpu())

    _dense_pass(model, list(named), batches, record, max_batches)
    fit = dict(epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, patience=patience)
    found = {named[attn]: (attn.heads, xs, ys) for attn, (xs, ys) in data.items()}
    return fit_all(found, max_rows, "head", **fit, holdout=holdout, seed=seed)


def head_norms(attn: HeadGatedAttention, o: Tensor, label: str = "norm", x: Tensor | None = None) -> Tensor:
    """(B, H): each head's output norm (``label="norm"``) or the norm of its ``proj`` contribution
    (``"contribution"``), mean over tokens, from the heads' outputs ``o`` (B, H, N, d).

    A layer with timm's output gate (``gated=True``) scales the heads' outputs before ``proj``: the contribution
    then needs the layer's input ``x`` (B, N, C) to compute that gate.
    """
    if label == "norm":
        return o.norm(dim=-1).mean(-1)
    if attn.gate is not None:
        if x is None:
            raise ConfigError(
                f"head_norms: {attn.heads.owner!r} has timm's output gate; pass the layer's input x for "
                "label='contribution'"
            )
        B, H, N, d = o.shape
        o = o * attn.gate(x).sigmoid().reshape(B, N, H, d).transpose(1, 2).to(o.dtype)
    w = attn.proj.weight.reshape(attn.proj.out_features, attn.num_heads, attn.head_dim).to(o.dtype)
    return torch.einsum("bhnd,chd->bhnc", o, w).norm(dim=-1).mean(-1)


def _dense_pass(model: nn.Module, layers: list[HeadGatedAttention], batches: Iterable, record, max_batches) -> int:
    """`dense_pass` over ``layers``, per-input neuron gates at keep 1."""
    from ..gates.neuron_gates import NeuronGate

    return dense_pass(model, layers, record, batches, max_batches, others=NeuronGate, owner="train_head_predictors_")

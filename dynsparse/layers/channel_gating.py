"""Per-input channel gating of timm ResNet blocks (FBS): each input runs only the channels its gate keeps.

`FBSBasicBlock` and `FBSBottleneck` are timm's ``BasicBlock`` / ``Bottleneck`` with the same children plus
one `dynsparse.gates.FBSGate` per gated set of internal channels, in a child ``gate`` (an ``nn.ModuleDict``
keyed by the producing conv: ``gate.conv1`` gates ``conv1``'s outputs, ``gate.conv2`` a Bottleneck's ``conv2``
outputs), so the state dict keeps every timm key and adds only ``*.gate.*`` keys. The residual width is never
gated, so blocks stay independent.

* **Gated channels.** BasicBlock: ``conv1``'s outputs (= ``conv2``'s inputs). Bottleneck: ``conv2``'s outputs
  (= ``conv3``'s inputs) and, by default (``bottleneck_conv1=True``), ``conv1``'s outputs too, so the 3×3
  ``conv2`` shrinks in both its input and output channels (FBS's quadratic saving).
* **Decisions up front.** Every gate of a block reads the block's input (its global average pool), so all
  of a block's decisions are known before its first conv. FBS predicts each layer from that layer's own input;
  for a Bottleneck's ``gate.conv2`` we read the block input instead (one pooling, and a batch can be planned
  whole: grouped by decision or by the union of kept channels).
* **Inference** (eval mode) gathers, per input, the kept filters of the producing conv with their BatchNorm
  statistics and affine, and the matching input slices of the consuming conv; the kept channels are scaled
  by their saliencies after the activation (FBS's ``ReLU(π · BN(conv x)) = π · ReLU(BN(conv x))`` for
  ``π ≥ 0``). A batch is run by `strategy` (see `FBSBlockMixin.strategy`).
* **Training** computes every channel and multiplies by the gate's output (``π`` on kept channels, 0
  elsewhere), so the gradient reaches the saliency weights.

`gate_channels_` installs the gates (``ds.sparsify_(model, {"channels": {"gate": "fbs", "keep": 0.5}})``
routes here), `channel_spec` gives the arguments that rebuild them (saved by ``ds.convert(static=False)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..errors import ConfigError, GateError, UnsupportedModuleError
from ..gates.base import InputDependentGate
from ..gates.channel_gates import CHANNEL_GATES
from ..modules import adopt, first_param, is_stateless, place_like
from ..sparsify import _patterns, _selected

__all__ = ["CHANNEL_GATES", "FBSBasicBlock", "FBSBottleneck", "channel_spec", "gate_channels_"]

_MKLDNN = torch.backends.mkldnn.is_available()
STRATEGIES = ("auto", "group", "loop", "union", "grouped_conv", "masked")


class FBSBlockMixin:
    """Shared forward of the FBS blocks. ``_stages``: ``(conv, norm, element-wise children)``; ``gate[conv]``.

    Attributes:
        strategy: How an eval batch runs: ``"auto"`` (default: one gathered run when every input made the same
            decisions, else the rule of `_auto`: the union of kept channels on small maps or when it is small,
            else one gathered run per group of equal decisions or per input),
            ``"group"`` (one gathered run per distinct decision), ``"loop"`` (one per input), ``"union"``
            (the union of every input's kept channels, zeros for the others), ``"grouped_conv"`` (per-input
            gathered weights stacked into one grouped conv), ``"masked"`` (dense convs, masked: no saving;
            for checking). Every strategy gives the same outputs up to float rounding.
    """

    _stages: tuple[tuple[str, str, tuple[str, ...]], ...]
    _last: tuple[str, str]
    _out_act: str
    strategy: str = "auto"

    def gates(self) -> list[tuple[str, InputDependentGate | None]]:
        """``(conv, gate or None)`` per stage."""
        return [(c, self.gate[c] if c in self.gate else None) for c, *_ in self._stages]  # noqa: SIM401

    def forward(self, x: Tensor) -> Tensor:
        ss = x.mean((2, 3))
        stages = [(getattr(self, c), getattr(self, n), [getattr(self, p) for p in post]) for c, n, post in self._stages]
        gates = [g for _, g in self.gates()]
        if self.training or self.strategy == "masked":
            mults = [None if g is None else g(ss) for g in gates]
            y = _masked(x, stages, mults, getattr(self, self._last[0]))
        else:
            decisions = [(None, None) if g is None else g.decide(ss) for g in gates]
            y = _run_batch(x, stages, decisions, getattr(self, self._last[0]), self.strategy)
        return self._tail(x, y)

    def _tail(self, x: Tensor, y: Tensor) -> Tensor:
        y = getattr(self, self._last[1])(y)
        if self.se is not None:
            y = self.se(y)
        if self.drop_path is not None:
            y = self.drop_path(y)
        shortcut = self.downsample(x) if self.downsample is not None else x
        return getattr(self, self._out_act)(y + shortcut)


# --------------------------------------------------------------------------------------------------- runners
# A stage is (conv, norm, [element-wise modules]); every runner returns the last conv's output (B, C_out, H, W).


def _conv(h: Tensor, conv: nn.Conv2d, w: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
    fast = _MKLDNN and h.dtype == torch.float32 and h.device.type == "cpu" and not torch.is_grad_enabled()
    if fast and not is_in_torch_dispatch_mode():  # FLOP counters and tracers see the plain conv below
        # F.conv2d sends a batch-1 3x3 conv with <= 20480 input values to a slow im2col kernel (measured: ~8 ms
        # for 256 -> 512 channels at 7x7, 3-4x oneDNN's time); gathered convs are often that small.
        # Both operands in one memory format (the input's), so mkldnn_convolution copies neither: a channels-last
        # input with an OIHW weight would be run channels-last after a copy of the weight.
        fmt = _format(h)
        return torch.ops.aten.mkldnn_convolution(
            h.contiguous(memory_format=fmt),
            w.contiguous(memory_format=fmt),
            bias,
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            groups,
        )
    return F.conv2d(h, w, bias, conv.stride, conv.padding, conv.dilation, groups)


def _format(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out channels-last, else ``torch.contiguous_format``."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _take(w: Tensor, dim: int, idx: Tensor) -> Tensor:
    """``w.index_select(dim, idx)`` (``dim`` 0 or 1) in ``w``'s memory format.

    A channels-last tensor is gathered on the contiguous (N, H·W·C) or (N·H·W, C) view of its storage:
    ``index_select`` on the 4-D view takes a strided path, 4x slower for rows and 8x for columns (measured: 0.8 vs
    0.2 ms and 5.4 vs 0.7 ms for 256 of 512 3x3 filters or input channels).
    """
    if _format(w) is torch.contiguous_format:
        return w.index_select(dim, idx)
    n, c, kh, kw = w.shape
    v = w.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
    if dim == 0:
        return v.reshape(n, -1).index_select(0, idx).view(-1, kh, kw, c).permute(0, 3, 1, 2)
    return v.reshape(-1, c).index_select(1, idx).view(n, kh, kw, -1).permute(0, 3, 1, 2)


def _bn_fold(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(C,) scale and shift of an eval BatchNorm: ``BN(y) = y · scale + shift``."""
    s = torch.rsqrt(norm.running_var + norm.eps)
    s = s if norm.weight is None else s * norm.weight
    t = -norm.running_mean * s
    return s, t if norm.bias is None else t + norm.bias


def _scale(h: Tensor, v: Tensor) -> Tensor:
    v = v[:, :, None, None]
    return h * v if torch.is_grad_enabled() else h.mul_(v)


def _masked(x: Tensor, stages, mults: list[Tensor | None], last: nn.Conv2d) -> Tensor:
    """Dense convs, kept channels scaled by their saliency and the others zeroed (training and checking)."""
    h = x
    for (conv, norm, post), m in zip(stages, mults, strict=True):
        h = norm(conv(h))
        for p in post:
            h = p(h)
        if m is not None:
            h = h * m[:, :, None, None]
    return last(h)


def _gathered(x: Tensor, stages, idxs: list[Tensor | None], vals: list[Tensor | None], last: nn.Conv2d) -> Tensor:
    """One set of kept channels for the whole of ``x``: idxs (k,) per stage (None: all), vals (B, k)."""
    h, prev = x, None
    for (conv, norm, post), idx, val in zip(stages, idxs, vals, strict=True):
        if idx is None:
            h = norm(_conv(h, conv, conv.weight if prev is None else _take(conv.weight, 1, prev)))
        else:
            s, t = _bn_fold(norm)
            w = _take(conv.weight, 0, idx)
            w = w if prev is None else _take(w, 1, prev)
            if w.numel() <= h.shape[0] * h.shape[2] * h.shape[3] * w.shape[0] // (conv.stride[0] * conv.stride[1]):
                # BatchNorm folded into the gathered filters (fewer values than the output): a conv with bias
                h = _conv(h, conv, w * s.index_select(0, idx)[:, None, None, None], t.index_select(0, idx))
            else:  # small maps: the norm on the output is the cheaper pass
                h = _conv(h, conv, w)
                h = torch.addcmul(t.index_select(0, idx)[:, None, None], h, s.index_select(0, idx)[:, None, None])
        for p in post:
            h = p(h)
        if val is not None:
            h = _scale(h, val)
        prev = idx
    return _conv(h, last, last.weight if prev is None else _take(last.weight, 1, prev))


def _grouped(x: Tensor, stages, idxs: list[Tensor | None], vals: list[Tensor | None], last: nn.Conv2d) -> Tensor:
    """Per-input kept channels (idxs (B, k)): each input's gathered weights stacked into one grouped conv.

    Runs in NCHW, where stacking the inputs along the channels is a view (in channels-last it is a transposing copy
    at every stage); a channels-last ``x`` is reordered once on the way in and once on the way out.
    """
    n, h, prev, fmt = x.shape[0], x.contiguous(), None, _format(x)
    for conv, norm, post, idx, val in [(*s, i, v) for s, i, v in zip(stages, idxs, vals, strict=True)] + [
        (last, None, [], None, None)
    ]:
        w = conv.weight
        if idx is None and prev is None:
            h = conv(h) if norm is None else norm(conv(h))
        else:
            if idx is not None and prev is not None:
                w = w[idx[:, :, None], prev[:, None, :]]  # (B, k, k_prev, kh, kw)
            elif idx is not None:
                w = w[idx]
            else:
                w = w[:, prev].transpose(0, 1)
            h = _conv(h.reshape(1, -1, *h.shape[2:]), conv, w.reshape(-1, *w.shape[2:]), groups=n)
            h = h.reshape(n, -1, *h.shape[2:])
            if norm is not None and idx is None:
                h = norm(h)
            elif norm is not None:
                s, t = _bn_fold(norm)
                h = torch.addcmul(t[idx][:, :, None, None], h, s[idx][:, :, None, None])
        for p in post:
            h = p(h)
        if val is not None:
            h = _scale(h, val)
        prev = idx
    return h.contiguous(memory_format=fmt)


def _run_batch(x: Tensor, stages, decisions, last: nn.Conv2d, strategy: str) -> Tensor:
    """Eval forward of a batch by ``strategy`` (see `FBSBlockMixin.strategy`); decisions (idx (B, k), val (B, k))."""
    idxs, vals = [d[0] for d in decisions], [d[1] for d in decisions]
    n = x.shape[0]
    conv = stages[0][0]
    if strategy == "auto" and x.shape[2] * x.shape[3] < 4 * conv.stride[0] * conv.stride[1]:
        strategy = "masked"  # 1x1 maps: gathering the weights costs more than the dense conv (measured: 20 vs 2 ms)
    if strategy != "masked" and (n == 1 or strategy in ("auto", "group")):
        keys = torch.cat([i for i in idxs if i is not None], 1)
        uniq, inv = torch.unique(keys, dim=0, return_inverse=True) if n > 1 else (keys, None)
        if len(uniq) == 1:
            return _gathered(x, stages, [None if i is None else i[0] for i in idxs], vals, last)
        if strategy == "auto":
            strategy = _auto(x, stages, idxs, n, len(uniq))
    if strategy == "grouped_conv":
        return _grouped(x, stages, idxs, vals, last)
    if strategy == "masked":
        mults = [
            None if i is None else v.new_zeros(n, c.out_channels).scatter(1, i, v)
            for (c, *_), i, v in zip(stages, idxs, vals, strict=True)
        ]
        return _masked(x, stages, mults, last)
    if strategy == "union":
        us = [None if i is None else torch.unique(i) for i in idxs]
        vs = []
        for (conv, *_), i, v, u in zip(stages, idxs, vals, us, strict=True):
            if i is not None:
                full = v.new_zeros(n, conv.out_channels).scatter(1, i, v)
                v = full.index_select(1, u)
            vs.append(v)
        return _gathered(x, stages, us, vs, last)
    if strategy == "group":
        out = None
        for g in range(int(inv.max()) + 1):
            rows = (inv == g).nonzero().squeeze(1)
            r0 = int(rows[0])
            sub_v = [None if v is None else v.index_select(0, rows) for v in vals]
            y = _take(x, 0, rows)
            y = _gathered(y, stages, [None if i is None else i[r0] for i in idxs], sub_v, last)
            if out is None:
                out = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=_format(y))
            out.index_copy_(0, rows, y)
        return out
    return torch.cat(  # "loop"
        [
            _gathered(
                x[b : b + 1],
                stages,
                [None if i is None else i[b] for i in idxs],
                [None if v is None else v[b : b + 1] for v in vals],
                last,
            )
            for b in range(n)
        ]
    )


def _auto(x: Tensor, stages, idxs: list[Tensor | None], n: int, groups: int) -> str:
    """The strategy ``"auto"`` picks for a batch with more than one distinct decision (see `FBSBlockMixin`).

    Per-input runs re-gather weights for every input (or group); below 8x8 output positions a conv does too
    little work per weight for that to pay, so small maps run the union of the kept channels, or masked when the
    union is every channel. Otherwise the union when it is at most 1.25x one input's share, else per group when
    groups hold two inputs on average, else per input (measurements in docs/dynamic_channels.md).
    """
    conv = stages[0][0]
    positions = x.shape[2] * x.shape[3] / (conv.stride[0] * conv.stride[1])
    fr = []
    for (c, *_), i in zip(stages, idxs, strict=True):
        if i is not None:
            fr.append((torch.unique(i).numel() / c.out_channels, i.shape[1] / c.out_channels))
    if positions < 64:
        return "masked" if all(u == 1.0 for u, _ in fr) else "union"
    if all(u <= 1.25 * k for u, k in fr):
        return "union"
    return "group" if groups <= n // 2 else "loop"


def _why_not(host: nn.Module, stages, last: tuple[str, str]) -> str | None:
    """Why ``host`` cannot be run by the gathered forward, or None."""
    aa = getattr(host, "aa", None)
    if aa is not None and not isinstance(aa, nn.Identity):
        return f"anti-aliasing ({type(aa).__name__}) on the gated channels is not supported"
    convs = [c for c, *_ in stages] + [last[0]]
    norms = [n for _, n, *_ in stages] + [last[1]]
    for c in convs:
        m = getattr(host, c)
        plain = m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.bias is None
        if type(m) is not nn.Conv2d or not plain:
            return f"{c} must be a plain nn.Conv2d (groups=1, zero padding, no bias), got {m!r}"
    for n in norms:
        m = getattr(host, n)
        if type(m) is not nn.BatchNorm2d or not m.track_running_stats:
            return f"{n} must be an nn.BatchNorm2d with running statistics, got {type(m).__name__}"
    for _, _, post in stages:
        for p in post:
            if not is_stateless(getattr(host, p)):
                return (
                    f"{p} ({type(getattr(host, p)).__name__}) holds parameters; only element-wise modules may sit there"
                )
    return None


class FBSBasicBlock(FBSBlockMixin, BasicBlock):
    """timm ``BasicBlock`` whose ``conv1`` outputs are gated per input by ``gate.conv1`` (see the module doc)."""

    _stages = (("conv1", "bn1", ("drop_block", "act1", "aa")),)
    _last = ("conv2", "bn2")
    _out_act = "act2"

    @classmethod
    def from_module(cls, block: BasicBlock, gates: dict[str, InputDependentGate]) -> FBSBasicBlock:
        """An `FBSBasicBlock` sharing ``block``'s children and parameters, with ``gates`` (``{"conv1": gate}``)."""
        return _adopt(block, cls, gates)


class FBSBottleneck(FBSBlockMixin, Bottleneck):
    """timm ``Bottleneck`` with ``conv2``'s outputs gated (``gate.conv2``), optionally ``conv1``'s (``gate.conv1``)."""

    _stages = (("conv1", "bn1", ("act1",)), ("conv2", "bn2", ("drop_block", "act2", "aa")))
    _last = ("conv3", "bn3")
    _out_act = "act3"

    @classmethod
    def from_module(cls, block: Bottleneck, gates: dict[str, InputDependentGate]) -> FBSBottleneck:
        """An `FBSBottleneck` sharing ``block``'s children, with ``gates`` (``{"conv2": g}`` or also ``"conv1"``)."""
        return _adopt(block, cls, gates)


def _adopt(block: nn.Module, cls: type, gates: dict[str, InputDependentGate]) -> nn.Module:
    known = [c for c, *_ in cls._stages]
    if not gates or any(c not in known for c in gates):
        raise ConfigError(f"{cls.__name__}: gates must be keyed by some of {known}, got {sorted(gates)}")
    new = adopt(block, cls)
    new.gate = nn.ModuleDict({c: gates[c] for c in known if c in gates})
    return new


_TWINS = {BasicBlock: FBSBasicBlock, Bottleneck: FBSBottleneck}


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f, m) for f, m in model.named_modules() if type(m) in _TWINS or isinstance(m, FBSBlockMixin)]


def gate_channels_(
    model: nn.Module,
    gate: str = "fbs",
    keep: float = 0.5,
    blocks: str | Sequence[int | str] = "all",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    bottleneck_conv1: bool = True,
    strategy: str = "auto",
    **gate_kwargs: Any,
) -> nn.Module:
    """Gate the internal channels of a timm ResNet's blocks per input (in place); returns ``model``.

    Args:
        model: A timm ResNet-family model (``BasicBlock`` / ``Bottleneck`` blocks).
        gate: A name of `CHANNEL_GATES` (``"fbs"``).
        keep: Fraction of the gated channels each input keeps, in (0, 1] (the run-time knob).
        blocks: ``"all"``, or block indices (in ``named_modules`` order of the ResNet blocks) or block fqns.
        include: fqn globs; only matching blocks are gated.
        exclude: fqn globs; matching blocks are not gated.
        bottleneck_conv1: Also gate a Bottleneck's ``conv1`` outputs (``gate.conv1``), not only ``conv2``'s.
        strategy: How eval batches run (see `FBSBlockMixin.strategy`).
        **gate_kwargs: Gate options (``weight``, ``init_std`` of `dynsparse.gates.FBSGate`).

    Raises:
        ConfigError: an unknown gate (with suggestions), a bad ``keep``, ``blocks`` or option.
        UnsupportedModuleError: the model has no ResNet block, or a chosen block cannot be gated (names it).

    Examples:
        >>> import timm, dynsparse as ds
        >>> m = ds.sparsify_(timm.create_model("resnet10t"), {"channels": {"gate": "fbs", "keep": 0.5}})
        >>> type(m.layer1[0]).__name__, m.layer1[0].gate["conv1"].num_kept()
        ('FBSBasicBlock', 32)
    """
    cls = CHANNEL_GATES.get(gate)
    if strategy not in STRATEGIES:
        raise ConfigError(f"channels.strategy: one of {', '.join(STRATEGIES)} expected, got {strategy!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ConfigError(f"channels.keep: a fraction in (0, 1] expected, got {keep!r}")
    if not isinstance(bottleneck_conv1, bool):
        raise ConfigError(f"channels.bottleneck_conv1: true or false expected, got {bottleneck_conv1!r}")
    found = _blocks(model)
    if not found:
        raise UnsupportedModuleError(
            "",
            type(model).__name__,
            "channels",
            "per-input channel gates need timm ResNet BasicBlock/Bottleneck blocks",
        )
    chosen = _choose(found, blocks, include, exclude)
    for fqn, block in chosen:
        if isinstance(block, FBSBlockMixin):
            raise UnsupportedModuleError(
                fqn, type(block).__name__, "channels", "it already has per-input channel gates"
            )
        twin = _TWINS[type(block)]
        reason = _why_not(block, twin._stages, twin._last)
        if reason is not None:
            raise UnsupportedModuleError(fqn, type(block).__name__, "channels", reason)
    built = []  # every gate is built before any block changes, so a bad gate option changes nothing
    for fqn, block in chosen:
        if type(block) is BasicBlock:
            built.append(
                (
                    fqn,
                    FBSBasicBlock.from_module(
                        block, {"conv1": _make(cls, gate, fqn, block, "conv1", keep, gate_kwargs)}
                    ),
                )
            )
        else:
            gs = {
                c: _make(cls, gate, fqn, block, c, keep, gate_kwargs)
                for c in ("conv1", "conv2")[not bottleneck_conv1 :]
            }
            built.append((fqn, FBSBottleneck.from_module(block, gs)))
    for fqn, new in built:
        if strategy != "auto":
            new.strategy = strategy
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def _make(cls, name: str, fqn: str, block: nn.Module, conv: str, keep: float, kwargs: dict) -> InputDependentGate:
    p = first_param(block)
    dd = {"device": p.device if p is not None else None, "dtype": p.dtype if p is not None else None}
    try:
        gate = cls(block.conv1.in_channels, getattr(block, conv).out_channels, keep=keep, **kwargs, **dd)
    except (TypeError, ConfigError, GateError) as e:
        raise ConfigError(f"channels: bad option for gate {name!r} at {fqn!r}: {e}") from None
    return place_like(gate, block)


def _choose(found, blocks, include, exclude) -> list[tuple[str, nn.Module]]:
    inc, exc = _patterns(include, "channels.include"), _patterns(exclude, "channels.exclude")
    if blocks == "all":
        chosen = list(found)
    else:
        items = [blocks] if isinstance(blocks, (int, str)) else list(blocks)
        names = [f for f, _ in found]
        chosen = []
        for b in items:
            if isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(found):
                chosen.append(found[b])
            elif isinstance(b, str) and b in names:
                chosen.append(found[names.index(b)])
            else:
                raise ConfigError(
                    f"channels.blocks: 'all', block indices in [0, {len(found)}) or block fqns "
                    f"({', '.join(names[:4])}, ...) expected, got {b!r}"
                )
    chosen = [(f, m) for f, m in chosen if _selected(f, inc, exc)]
    if not chosen:
        raise ConfigError("channels: the blocks / include / exclude options leave no block to gate")
    return chosen


def channel_spec(model: nn.Module) -> dict | None:
    """The `gate_channels_` arguments that rebuild ``model``'s per-input channel gates, or None when it has none.

    Raises:
        ConfigError: gates with different settings (one kind and one setting per model can be saved).
    """
    found = [(f, m) for f, m in model.named_modules() if isinstance(m, FBSBlockMixin)]
    if not found:
        return None
    gates = [g for _, m in found for _, g in m.gates() if g is not None]
    settings = {(type(g), g.keep, g.weight, g.init_std) for g in gates}
    conv1 = {"conv1" in m.gate for _, m in found if isinstance(m, FBSBottleneck)}
    strategies = {m.strategy for _, m in found}
    if len(settings) > 1 or len(conv1) > 1 or len(strategies) > 1:
        raise ConfigError("channels: per-input channel gates with different settings cannot be saved in one plan yet")
    g = gates[0]
    name = next(n for n in CHANNEL_GATES.names() if CHANNEL_GATES.get(n) is type(g))
    return {
        "gate": name,
        "keep": g.keep,
        "blocks": [f for f, _ in found],
        "bottleneck_conv1": conv1.pop() if conv1 else True,
        "strategy": strategies.pop(),
        "weight": g.weight,
        "init_std": g.init_std,
    }

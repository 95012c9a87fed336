"""PyTorch runners of a ResNet block's convs on a subset of their channels (used by `dynsparse.layers.channel_gating`).

A stage is ``(conv, norm, [element-wise modules])``, ``last`` is ``(conv, norm)``; every runner returns the last
norm's output (B, C_out, H, W):

* `_masked`: dense convs, the kept channels scaled by their saliency and the others zeroed (training, checking);
* `_gathered`: one set of kept channels for the whole batch: the kept filters of each producing conv (BatchNorm
  folded in where that is cheaper) and the matching input slices of its consumer;
* `_grouped`: per-input kept channels, each input's gathered weights stacked into one grouped conv;
* `_run_batch`: the eval forward of a batch by a strategy (see `FBSBlockMixin.strategy`), `_auto` the rule of
  ``"auto"``.

Convs run in the input's memory format (a channels-last input stays channels-last), and small float32 CPU convs go
straight to oneDNN (`_conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .. import kernels
from ..errors import DynsparseError

_MKLDNN = torch.backends.mkldnn.is_available()


def _conv(h: Tensor, conv: nn.Conv2d, w: Tensor, bias: Tensor | None = None, groups: int = 1) -> Tensor:
    fast = _MKLDNN and h.dtype == torch.float32 and h.device.type == "cpu" and not torch.is_grad_enabled()
    # FLOP counters, tracers and torch.compile (no fake-tensor kernel for mkldnn_convolution) see the plain conv
    if fast and not is_in_torch_dispatch_mode() and not torch.compiler.is_compiling():
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


def _weight(
    w: Tensor, rows: Tensor | None, cols: Tensor | None, scale: Tensor | None = None, kernel: bool | None = None
) -> Tensor:
    """``w[rows][:, cols]``, each kept filter times its ``scale``, in ``w``'s memory format.

    None: all rows / all columns / no scale; ``scale`` has one value per filter of ``w`` (O).

    One pass in the compiled `kernels.conv_gather` where it runs (eager float32 CPU inference; columns sorted, as
    the gates give them), measured 1.4-2.7x faster than the PyTorch passes below for 64-2048-channel weights;
    else ``index_select`` of rows, then of columns, then the multiply. Both give the same values. ``kernel``:
    `_kernel_gathers` of ``w`` when the caller has it already.
    """
    if (rows is not None or cols is not None) and (_kernel_gathers(w) if kernel is None else kernel):
        try:
            return kernels.conv_gather(w, rows, cols, scale)
        except DynsparseError:  # unsorted or repeated columns: PyTorch handles (or reports) them
            pass
    w = w if rows is None else _take(w, 0, rows)
    w = w if cols is None else _take(w, 1, cols)
    if scale is None:
        return w
    return w * (scale if rows is None else scale.index_select(0, rows))[:, None, None, None]


def _kernel_gathers(w: Tensor) -> bool:
    """True where `_weight` copies ``w``'s kept values with the compiled kernel (a scale then costs nothing)."""
    return kernels.eager_cpu(w) and kernels.load() is not None and w.is_contiguous(memory_format=_format(w))


def _bn_fold(norm: nn.BatchNorm2d, cache: FoldCache | None = None) -> tuple[Tensor, Tensor]:
    """(C,) scale and shift of an eval BatchNorm: ``BN(y) = y · scale + shift``.

    With ``cache`` (a `FoldCache` of the calling block, checked by it once per forward) the pair is computed once
    per block forward at most, not for every input and stage of a batch run input by input.
    """
    if cache is not None:
        return cache.get(norm)
    s = torch.rsqrt(norm.running_var + norm.eps)
    s = s if norm.weight is None else s * norm.weight
    t = -norm.running_mean * s
    return s, t if norm.bias is None else t + norm.bias


class FoldCache:
    """Folded BatchNorm scales and shifts of one block, kept while the norms' statistics and parameters are equal
    to a snapshot taken with them.

    `refresh` compares every source with its snapshot (``torch.equal``: a few microseconds per norm) and drops
    what changed. Versions would not do: BatchNorm updates its running statistics without bumping them, a change
    through ``.data`` does not either, and inference tensors have none. Used in inference only (no autograd).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[nn.Module, float, tuple, tuple[Tensor, Tensor]]] = {}

    @staticmethod
    def _sources(norm: nn.Module) -> tuple[Tensor | None, ...]:
        return norm.running_mean, norm.running_var, norm.weight, norm.bias

    def refresh(self) -> FoldCache:
        """Drop every entry whose norm changed since it was folded; returns ``self``."""
        for key, (norm, eps, snap, _) in list(self._entries.items()):
            if norm.eps != eps or not all(_same(t, c) for t, c in zip(self._sources(norm), snap, strict=True)):
                del self._entries[key]
        return self

    def get(self, norm: nn.Module) -> tuple[Tensor, Tensor]:
        hit = self._entries.get(id(norm))
        if hit is not None and hit[0] is norm:
            return hit[3]
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
            snap = tuple(None if t is None else t.detach().clone() for t in self._sources(norm))
            val = _bn_fold(norm)
        self._entries[id(norm)] = (norm, norm.eps, snap, val)
        return val


def _same(t: Tensor | None, copy: Tensor | None) -> bool:
    if t is None or copy is None:
        return t is copy
    return t.dtype == copy.dtype and t.device == copy.device and t.shape == copy.shape and torch.equal(t, copy)


def _scale(h: Tensor, v: Tensor) -> Tensor:
    v = v[:, :, None, None]
    return h * v if torch.is_grad_enabled() else h.mul_(v)


def _masked(x: Tensor, stages, mults: list[Tensor | None], last: tuple[nn.Conv2d, nn.Module]) -> Tensor:
    """Dense convs, kept channels scaled by their saliency and the others zeroed (training and checking)."""
    h = x
    for (conv, norm, post), m in zip(stages, mults, strict=True):
        h = norm(conv(h))
        for p in post:
            h = p(h)
        if m is not None:
            h = h * m[:, :, None, None]
    return last[1](last[0](h))


def _gathered(
    x: Tensor, stages, idxs: list[Tensor | None], vals: list[Tensor | None], last, cache: FoldCache | None = None
) -> Tensor:
    """One set of kept channels for the whole of ``x``: idxs (k,) per stage (None: all), vals (B, k).

    Each gathered conv takes its BatchNorm folded into the gathered filters (a conv with bias) where the compiled
    gather runs (the scale is applied during the copy) or the weight has fewer values than the output; else the
    norm runs on the output. The last conv too, when its input is gathered.
    """
    h, prev = x, None
    for (conv, norm, post), idx, val in zip(stages, idxs, vals, strict=True):
        if idx is None:
            h = norm(_conv(h, conv, conv.weight if prev is None else _weight(conv.weight, None, prev)))
        else:
            s, t = _bn_fold(norm, cache)
            kh, kw = conv.weight.shape[2:]
            n_w = idx.numel() * (conv.weight.shape[1] if prev is None else prev.numel()) * kh * kw  # gathered weight
            fast = _kernel_gathers(conv.weight)
            if fast or n_w <= _positions(h, conv) * idx.numel():
                # BatchNorm folded into the gathered filters: a conv with bias
                h = _conv(h, conv, _weight(conv.weight, idx, prev, s, fast), t.index_select(0, idx))
            else:  # small maps: the norm on the output is the cheaper pass
                h = _conv(h, conv, _weight(conv.weight, idx, prev, kernel=fast))
                h = torch.addcmul(t.index_select(0, idx)[:, None, None], h, s.index_select(0, idx)[:, None, None])
        for p in post:
            h = p(h)
        if val is not None:
            h = _scale(h, val)
        prev = idx
    conv, norm = last
    if prev is None:
        return norm(_conv(h, conv, conv.weight))
    kh, kw = conv.weight.shape[2:]
    fast = _kernel_gathers(conv.weight)
    if fast or prev.numel() * kh * kw <= _positions(h, conv):
        s, t = _bn_fold(norm, cache)
        return _conv(h, conv, _weight(conv.weight, None, prev, s, fast), t)
    return norm(_conv(h, conv, _weight(conv.weight, None, prev, kernel=fast)))


def _positions(h: Tensor, conv: nn.Conv2d) -> int:
    """About how many output positions ``conv`` computes on ``h`` (all images)."""
    return h.shape[0] * h.shape[2] * h.shape[3] // (conv.stride[0] * conv.stride[1])


def _grouped(
    x: Tensor, stages, idxs: list[Tensor | None], vals: list[Tensor | None], last, cache: FoldCache | None = None
) -> Tensor:
    """Per-input kept channels (idxs (B, k)): each input's gathered weights stacked into one grouped conv.

    Runs in NCHW, where stacking the inputs along the channels is a view (in channels-last it is a transposing copy
    at every stage); a channels-last ``x`` is reordered once on the way in and once on the way out.
    """
    n, h, prev, fmt = x.shape[0], x.contiguous(), None, _format(x)
    for conv, norm, post, idx, val in [(*s, i, v) for s, i, v in zip(stages, idxs, vals, strict=True)] + [
        (*last, [], None, None)
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
                s, t = _bn_fold(norm, cache)
                h = torch.addcmul(t[idx][:, :, None, None], h, s[idx][:, :, None, None])
        for p in post:
            h = p(h)
        if val is not None:
            h = _scale(h, val)
        prev = idx
    return h.contiguous(memory_format=fmt)


def _run_batch(
    x: Tensor,
    stages,
    decisions,
    last: tuple[nn.Conv2d, nn.Module],
    strategy: str,
    residual: Tensor | None = None,
    cache: FoldCache | None = None,
) -> Tensor:
    """Eval forward of a batch by ``strategy`` (see `FBSBlockMixin.strategy`); decisions (idx (B, k), val (B, k)).

    With ``residual`` (the block's shortcut, shaped like the output) the result is the sum: per-input runs then
    write ``y_b + residual_b`` straight into the batch output, one pass instead of a concatenation and an add.
    ``cache``: the calling block's `FoldCache` (None: fold afresh).
    """
    idxs, vals = [d[0] for d in decisions], [d[1] for d in decisions]
    n = x.shape[0]
    conv = stages[0][0]
    if strategy == "auto" and x.shape[2] * x.shape[3] < 4 * conv.stride[0] * conv.stride[1]:
        strategy = "masked"  # 1x1 maps: gathering the weights costs more than the dense conv (measured: 20 vs 2 ms)
    if n == 0:
        strategy = "masked"  # an empty batch: nothing to gather (and no decision to group by)
    elif strategy != "masked" and n == 1:
        strategy = "one"
    elif strategy in ("auto", "group"):
        keys = torch.cat([i for i in idxs if i is not None], 1)
        uniq, inv = torch.unique(keys, dim=0, return_inverse=True)
        if len(uniq) == 1:
            strategy = "one"
        elif strategy == "auto":
            strategy = _auto(x, stages, idxs, n, len(uniq))
    if strategy == "loop":
        return _loop(x, stages, idxs, vals, last, residual, cache)
    if strategy == "one":
        y = _gathered(x, stages, [None if i is None else i[0] for i in idxs], vals, last, cache)
    elif strategy == "grouped_conv":
        y = _grouped(x, stages, idxs, vals, last, cache)
    elif strategy == "masked":
        mults = [
            None if i is None else v.new_zeros(n, c.out_channels).scatter(1, i, v)
            for (c, *_), i, v in zip(stages, idxs, vals, strict=True)
        ]
        y = _masked(x, stages, mults, last)
    elif strategy == "union":
        us = [None if i is None else torch.unique(i) for i in idxs]
        vs = []
        for (conv, *_), i, v, u in zip(stages, idxs, vals, us, strict=True):
            if i is not None:
                full = v.new_zeros(n, conv.out_channels).scatter(1, i, v)
                v = full.index_select(1, u)
            vs.append(v)
        y = _gathered(x, stages, us, vs, last, cache)
    else:  # "group"
        y = None
        for g in range(int(inv.max()) + 1):
            rows = (inv == g).nonzero().squeeze(1)
            r0 = int(rows[0])
            sub_v = [None if v is None else v.index_select(0, rows) for v in vals]
            sub_i = [None if i is None else i[r0] for i in idxs]
            part = _gathered(_take(x, 0, rows), stages, sub_i, sub_v, last, cache)
            if y is None:
                y = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device, memory_format=_format(part))
            y.index_copy_(0, rows, part)
    return y if residual is None else y.add_(residual)  # y is always a fresh tensor here


def _loop(x: Tensor, stages, idxs, vals, last, residual: Tensor | None, cache: FoldCache | None) -> Tensor:
    """One gathered run per input, each written (plus its ``residual`` row) into one preallocated output."""
    out = None
    for b in range(x.shape[0]):
        y = _gathered(
            x[b : b + 1],
            stages,
            [None if i is None else i[b] for i in idxs],
            [None if v is None else v[b : b + 1] for v in vals],
            last,
            cache,
        )
        if out is None:
            out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=_format(y))
        if residual is None or torch.is_grad_enabled():  # out= does not support autograd: add afterwards
            out[b : b + 1] = y
        else:
            torch.add(y, residual[b : b + 1], out=out[b : b + 1])
    return out if residual is None or not torch.is_grad_enabled() else out + residual


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

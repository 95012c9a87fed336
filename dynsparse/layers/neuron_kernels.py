"""PyTorch kernels for running an MLP on a subset of its hidden neurons (used by `dynsparse.layers.neuron_gating`).

For one token in eager float32 CPU inference, the compiled kernels of `dynsparse.kernels` (built on first use)
run first where they are available (`kernel_row`, `kernel_cats`); the PyTorch functions here are the portable
path and the fallback.

For a single token the MLP is two matrix-vector products, bound by memory traffic, not arithmetic. What was
measured on the 2-core EPYC with one thread (``benchmarks/dynamic_neurons.py``, d = 1024):

* a gathered weight copy (``index_select`` of rows, then the product) reads the kept rows twice and writes
  them once: at keep 0.5 it costs ~1.3-1.5x the *dense* product, so for one token the producer (``fc1``,
  ``fc1_g``, ``fc1_x``) runs densely and selects when more than `GATHER_PRODUCER_BELOW` of the neurons are kept;
* the down projection uses ``F.embedding_bag`` over the transposed ``fc2`` weight (H, C), the activations as
  per-sample weights: it reads only the kept rows, with no copy. With the weights in cache it is 3x faster than
  the dense product at keep 0.5; with cold weights (the real case: an LLM-sized MLP does not fit in cache)
  it costs about as much as the dense product, because each 4 KB row is a separate page that the hardware
  prefetcher does not follow across;
* a `torch.compile`-generated fused gather-dot for the producer (``(W[idx] * x).sum(-1)``) gained < 10 % in the
  whole MLP and was dropped; its down-projection twin was 35x slower than ``embedding_bag``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels

__all__ = [
    "GATHER_PRODUCER_BELOW",
    "consumer_row",
    "kernel_cats",
    "kernel_row",
    "linear_rows",
    "producer_row",
    "transposed",
]

#: ``kernel="torch"``, one token: gather producer rows only below this kept fraction (measured crossover).
GATHER_PRODUCER_BELOW = 0.35


def linear_rows(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor | None) -> Tensor:
    """``F.linear`` with only the output rows ``idx`` of ``w`` / ``b`` (all when None): (n, C) -> (n, len(idx))."""
    if idx is None:
        return F.linear(x, w, b)
    return F.linear(x, w.index_select(0, idx), None if b is None else b.index_select(0, idx))


def producer_row(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor) -> Tensor:
    """Pre-activations of neurons ``idx`` for one token ``x`` (1, C): (1, len(idx))."""
    if idx.numel() > GATHER_PRODUCER_BELOW * w.shape[0]:
        return F.linear(x, w, b).index_select(1, idx)
    return linear_rows(x, w, b, idx)


def consumer_row(h: Tensor, idx: Tensor, w_t: Tensor, b: Tensor | None) -> Tensor:
    """``fc2`` on one token's kept activations ``h`` (1, len(idx)), from the transposed weight ``w_t`` (H, C)."""
    y = F.embedding_bag(idx[None], w_t, per_sample_weights=h, mode="sum")
    return y if b is None else y + b


def transposed(owner: object, w: Tensor) -> Tensor:
    """``w.t()`` as a row-major copy, cached on ``owner`` (attributes ``_w2t`` / ``_w2t_src``) until ``w`` changes.

    The cache holds ``w`` itself, so a new weight at a reused address is not mistaken for the old one. Where
    autograd records (grad mode and ``w`` requires grad) it returns a fresh differentiable copy instead: a cached
    copy is detached, and ``w`` would get no gradient. Nothing is cached for an inference tensor (no version
    counter). See `kernels.pack_neurons` for which changes of ``w`` are seen.
    """
    if torch.is_grad_enabled() and w.requires_grad:
        return w.t().contiguous()  # a copy: embedding_bag on the strided view is ~50x slower
    if not kernels._cache_valid(getattr(owner, "_w2t_src", None), (w,)):
        with torch.inference_mode(False), torch.no_grad():
            # a copy with row-major strides: ``w.t().contiguous()`` of a (1, H) weight is the (H, 1) view with
            # strides (1, H), which the kernels (unit column stride) refuse
            owner._w2t = torch.empty(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device).copy_(w.detach().t())
        owner._w2t_src = kernels._cache_key((w,))
    return owner._w2t


def kernel_row(mlp: nn.Module, rows: Tensor, g: Tensor | None, idx: Tensor) -> Tensor | None:
    """One token (1, C) of a neuron-gated ``mlp`` over its kept neurons ``idx`` through `dynsparse.kernels.neuron_rows`.

    Each kept neuron's producer rows and ``fc2`` column are read as one contiguous stream from a packed copy of
    the weights (`dynsparse.kernels.pack_neurons`); with ``g`` (cats: the activated gate values, (1, H), already
    computed) a plain ``Mlp`` gathers only ``fc2``, from the cached transposed copy. Returns None where the
    kernel does not apply (the caller's PyTorch path runs); ``fc2``'s bias is added, dropout is not.
    """
    wg, bg, wv, bv = mlp._producers()
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias
    has_g = g is None  # dejavu: the gate activation is computed here; cats brought it
    code = kernels.act_code(mlp.act) if has_g else 0
    if not _runnable(mlp, code, rows, w2, wg, bg, wv, bv, b2, g):
        return None
    if not has_g and wv is None:  # cats on a plain Mlp: only fc2 is gathered, from its transposed copy
        packed = transposed(mlp, w2)
    else:
        packed = kernels.pack_neurons(mlp, wg if has_g else None, wv, w2)
    y = kernels.neuron_rows(
        packed, rows[0], idx, c_in=rows.shape[1], has_g=has_g, has_v=wv is not None,
        g_pre=None if has_g else g[0].index_select(0, idx), b_g=bg, b_v=bv, act=code,
    )  # fmt: skip
    return y if b2 is None else y + b2


def kernel_cats(mlp: nn.Module, rows: Tensor) -> Tensor | None:
    """One token (1, C) of a ``cats``-gated ``mlp`` through `dynsparse.kernels.cats_rows`, which thresholds too.

    The gate projection is read whole, four rows at a time, then only the kept neurons' value rows and ``fc2``
    columns; no PyTorch op runs between the two passes. Returns None where the kernel does
    not apply (the caller's PyTorch path runs); ``fc2``'s bias is added, dropout is not.
    """
    wg, bg, wv, bv = mlp._producers()
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias
    code = kernels.act_code(mlp.act)
    if mlp.strategy != "auto" or wg.stride(1) != 1 or not _runnable(mlp, code, rows, w2, wg, bg, wv, bv, b2):
        return None
    t = mlp.neurons.current_threshold()  # refuses an uncalibrated gate, by name
    packed = transposed(mlp, w2) if wv is None else kernels.pack_neurons(mlp, None, wv, w2)
    y = kernels.cats_rows(wg, bg, rows[0], t, packed, has_v=wv is not None, b_v=bv, act=code)
    return y if b2 is None else y + b2


def _runnable(mlp: nn.Module, code: int | None, *tensors: Tensor | None) -> bool:
    """True when a compiled kernel may run ``mlp`` on these tensors: a known activation ``code``, no dropout
    that would drop (``drop1`` in training mode on its own: the kernels do not drop), no CPU autocast (the kernels
    compute and return float32), weights that are not inference tensors (their pack could not be cached),
    `kernels.eager_cpu`, and a built library (built here, on the first call that can use it)."""
    d = getattr(mlp, "drop1", None)
    if code is None or (isinstance(d, nn.Dropout) and d.training and d.p > 0) or torch.is_autocast_enabled("cpu"):
        return False
    wg, _, wv, _ = mlp._producers()
    if any(w is not None and w.is_inference() for w in (wg, wv, mlp.fc2.weight)):
        return False
    return kernels.eager_cpu(*(t for t in tensors if t is not None)) and kernels.load() is not None

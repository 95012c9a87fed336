"""PyTorch kernels for running an MLP on a subset of its hidden neurons (used by `dynsparse.layers.neuron_gating`).

For one token in eager float32 CPU inference, `dynsparse.kernels.neuron_rows` (a small compiled C kernel,
built on first use) runs first where it is available; these are the portable path and the fallback.

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
from torch import Tensor

__all__ = ["GATHER_PRODUCER_BELOW", "consumer_row", "linear_rows", "producer_row", "transposed"]

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
    """``w.t().contiguous()``, cached on ``owner`` (attributes ``_w2t`` / ``_w2t_src``) until ``w`` changes.

    The cache holds ``w`` itself, so a new weight at a reused address is not mistaken for the old one.
    """
    from ..kernels import _cache_key, _cache_valid

    if not _cache_valid(getattr(owner, "_w2t_src", None), (w,)):
        with torch.inference_mode(False), torch.no_grad():
            owner._w2t = w.t().contiguous()
        owner._w2t_src = _cache_key((w,))
    return owner._w2t

"""CPU kernels for running an MLP on a subset of its hidden neurons (used by `dynsparse.layers.neuron_gating`).

For a single token the MLP is two matrix-vector products, bound by memory traffic, not arithmetic: a gathered
weight copy (``index_select`` of rows, then a product) reads the kept rows twice and writes them once, so at
keep 0.5 it costs *more* than the dense product. What pays off on CPU (``benchmarks/dynamic_neurons.py``):

* down projection: ``F.embedding_bag`` over the transposed ``fc2`` weight (H, C) with the activations as
  per-sample weights sums only the kept rows, with no copy (``kernel="torch"``, the default);
* up / gate projection: stock PyTorch has no copy-free row-gather product, so ``kernel="torch"`` runs the dense
  product when more than `GATHER_PRODUCER_BELOW` of the neurons are kept and selects; ``kernel="compiled"``
  uses a `torch.compile`-generated fused gather-dot (``(W[idx] * x).sum(-1)``, reads the kept rows once; needs a
  C++ compiler, compiles on first use, ~10-60 s, then cached by inductor) and the same for the down projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GATHER_PRODUCER_BELOW", "KERNELS", "consumer_row", "linear_rows", "producer_row", "transposed"]

#: ``kernel="torch"``, one token: gather producer rows only below this kept fraction (measured crossover).
GATHER_PRODUCER_BELOW = 0.35
KERNELS = ("torch", "compiled")
_compiled: dict[str, object] = {}


def linear_rows(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor | None) -> Tensor:
    """``F.linear`` with only the output rows ``idx`` of ``w`` / ``b`` (all when None): (n, C) -> (n, len(idx))."""
    if idx is None:
        return F.linear(x, w, b)
    return F.linear(x, w.index_select(0, idx), None if b is None else b.index_select(0, idx))


def _rows_dot(w: Tensor, idx: Tensor, x: Tensor) -> Tensor:
    return (w[idx] * x).sum(-1)


def _rows_axpy(w: Tensor, idx: Tensor, h: Tensor) -> Tensor:
    return (w[idx] * h[:, None]).sum(0)


def _kernel(name: str):
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile({"dot": _rows_dot, "axpy": _rows_axpy}[name], fullgraph=True)
    return fn


def producer_row(x: Tensor, w: Tensor, b: Tensor | None, idx: Tensor, kernel: str) -> Tensor:
    """Pre-activations of neurons ``idx`` for one token ``x`` (1, C): (1, len(idx))."""
    if kernel == "compiled":
        out = _kernel("dot")(w, idx, x[0])[None]
        return out if b is None else out + b.index_select(0, idx)
    if idx.numel() > GATHER_PRODUCER_BELOW * w.shape[0]:
        return F.linear(x, w, b).index_select(1, idx)
    return linear_rows(x, w, b, idx)


def consumer_row(h: Tensor, idx: Tensor, w_t: Tensor, b: Tensor | None, kernel: str) -> Tensor:
    """``fc2`` on one token's kept activations ``h`` (1, len(idx)), from the transposed weight ``w_t`` (H, C)."""
    if kernel == "compiled":
        y = _kernel("axpy")(w_t, idx, h[0])[None]
    else:
        y = F.embedding_bag(idx[None], w_t, per_sample_weights=h, mode="sum")
    return y if b is None else y + b


def transposed(owner: object, w: Tensor) -> Tensor:
    """``w.t().contiguous()``, cached on ``owner`` (attributes ``_w2t`` / ``_w2t_key``) until ``w`` changes."""
    key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
    if getattr(owner, "_w2t_key", None) != key:
        with torch.inference_mode(False), torch.no_grad():
            owner._w2t = w.t().contiguous()
        owner._w2t_key = key
    return owner._w2t

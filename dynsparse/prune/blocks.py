"""Block and N:M sparsity: ``block_mask``, ``nm_mask`` and `BlockSparseLinear`, a Linear that runs a BSR kernel.

On CPU, dense masked weights give no speed-up; a torch BSR tensor with 32×32 blocks does from about 90 % block
sparsity on (1.5–2× at 90 %, slower than dense below ~80 %). `BlockSparseLinear` measures both kernels on the
machine it runs on and keeps the sparse one only where it measured faster.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DynsparseError
from ..importance._util import used_weight
from ..registry import suggest
from .unstructured import _check_fraction, _count, _lowest

__all__ = ["BLOCK_SCORES", "EVICT_BYTES", "BlockSparseLinear", "block_mask", "block_scores", "nm_mask"]

log = logging.getLogger(__name__)

#: Block norms `block_mask` ranks blocks by.
BLOCK_SCORES = ("l1", "l2")
_MODES = ("bsr", "dense")


def _pair(block: int | Sequence[int]) -> tuple[int, int]:
    pair = (block, block) if isinstance(block, int) else tuple(block)
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair):
        raise ConfigError(f"block must be a positive int or a pair of them, got {block!r}")
    return pair


def block_scores(weight: Tensor, block: int | Sequence[int], score: Literal["l1", "l2"] = "l1") -> Tensor:
    """Norm of each block of a 2-D ``weight`` (out, in): shape (out / b_out, in / b_in)."""
    bh, bw = _pair(block)
    if score not in BLOCK_SCORES:
        raise ConfigError(f"unknown block score {score!r}.{suggest(str(score), BLOCK_SCORES)} Known: l1, l2")
    if weight.dim() != 2:
        raise ConfigError(f"block sparsity needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if rows % bh or cols % bw:
        raise ConfigError(f"weight shape {(rows, cols)} is not divisible by the block {(bh, bw)}")
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    tiles = w.reshape(rows // bh, bh, cols // bw, bw)
    return tiles.abs().sum((1, 3)) if score == "l1" else tiles.pow(2).sum((1, 3)).sqrt()


def block_mask(
    weight: Tensor, block: int | Sequence[int], sparsity: float, score: Literal["l1", "l2"] = "l1"
) -> Tensor:
    """Keep mask removing exactly ``round(sparsity · n_blocks)`` blocks, those of the lowest norm.

    Args:
        weight: (out, in), both divisible by the block.
        block: ``b`` or ``(b_out, b_in)``.
        sparsity: Fraction of blocks removed, in [0, 1].
        score: ``"l1"`` (sum of |w|) or ``"l2"`` (Frobenius norm) of each block; ties go by position.

    Returns:
        Bool (out, in), constant on each block.

    Examples:
        >>> m = block_mask(torch.randn(64, 96), 32, 0.5)
        >>> int(m.sum()) // (32 * 32)
        3
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    bh, bw = _pair(block)
    s = block_scores(weight, (bh, bw), score)
    pruned = _lowest(s.flatten(), _count(sparsity, s.numel())).view(s.shape)
    return (~pruned).repeat_interleave(bh, 0).repeat_interleave(bw, 1)


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M keep mask: in every group of ``m`` consecutive weights along the input dimension, the ``n`` largest |w|.

    For a conv weight (out, in, kh, kw) the groups run along the input channels, for each output channel and
    kernel position (NVIDIA ASP's layout, the ``(out, kh, kw, in)`` order the 2:4 sparse tensor-core kernels
    read; groups along the flattened ``in · kh · kw`` would mix kernel positions, which no kernel can use).
    Every group keeps exactly ``n`` entries; ties go by position, the lower index pruned first (as
    ``unstructured_`` and ``importance.unstructured_masks`` break them), the same on every device.

    Args:
        weight: (out, in) or (out, in, ...); ``in`` must be divisible by ``m``.
        n: Weights kept per group, 0 <= n <= m.
        m: Group size.

    Returns:
        Bool mask of ``weight``'s shape.

    Examples:
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
        tensor([[False,  True,  True, False]])
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ConfigError(f"nm_mask: m must be an integer >= 1, got {m!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
        raise ConfigError(f"nm_mask: n must be an integer in [0, m={m}], got {n!r}")
    if weight.dim() < 2:
        raise ConfigError(f"nm_mask needs a weight of 2 or more dims (out, in, ...), got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if cols % m:
        raise ConfigError(f"nm_mask: input size {cols} of weight {tuple(weight.shape)} is not divisible by m={m}")
    inner = weight.detach().movedim(1, -1)  # (out, ..., in): the groups run along the input channels
    w = inner.abs().reshape(-1, m)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    # a stable sort, not topk (whose choice among equal values is unspecified and differs between kernels)
    pruned = torch.sort(w, dim=1, stable=True).indices[:, : m - n]
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    keep.scatter_(1, pruned, False)
    return keep.reshape(inner.shape).movedim(-1, 1).contiguous()


#: Bytes written between two cold-cache samples, to push a layer's weight out of the CPU caches.
EVICT_BYTES = 64 * 2**20


def _time_pair(
    fa: Callable[[], object],
    fb: Callable[[], object],
    rounds: int,
    warmup: int,
    cache: Literal["warm", "cold"] = "warm",
    min_seconds: float = 3e-3,
) -> list[float]:
    """Paired ratios time(fa) / time(fb) over ``rounds`` rounds, the order alternating, after ``warmup`` calls.

    ``cache="warm"``: each sample first runs its call untimed (about ``min_seconds``), then times enough
    calls to last ``min_seconds`` (the same count for both), so neither pays for the other having evicted its
    weight. ``cache="cold"``: each sample times one call right after writing `EVICT_BYTES` of memory, as when
    a layer runs once inside a model too large for the caches.
    """
    single = {fa: math.inf, fb: math.inf}
    for _ in range(max(1, warmup)):
        for f in (fa, fb):
            start = time.perf_counter()
            f()
            single[f] = min(single[f], time.perf_counter() - start)
    if cache == "warm":
        reps = max(1, math.ceil(min_seconds / max(min(single.values()), 1e-9)))
        pre, evict = reps, None
    else:
        reps, pre, evict = 1, 0, torch.zeros(EVICT_BYTES // 4)

    def timed(f: Callable[[], object]) -> float:
        if evict is not None:
            evict.add_(1.0)
        for _ in range(pre):
            f()
        start = time.perf_counter()
        for _ in range(reps):
            f()
        return time.perf_counter() - start

    ratios = []
    was_enabled = gc.isenabled()
    gc.disable()  # no collection inside a timed sample
    try:
        for r in range(rounds):
            if r % 2:
                tb, ta = timed(fb), timed(fa)
            else:
                ta, tb = timed(fa), timed(fb)
            ratios.append(ta / tb)
    finally:
        if was_enabled:
            gc.enable()
    return ratios


class BlockSparseLinear(nn.Module):
    """A Linear layer with a block-sparse weight that runs a torch BSR kernel where that is faster on this machine.

    Holds the masked dense ``weight`` (out, in) and ``bias`` (same state-dict keys as ``nn.Linear``; frozen:
    ``requires_grad=False``) and builds the BSR copy on first use (rebuilt when the weight is replaced or changed
    in place through autograd-visible ops such as ``weight.copy_`` or ``load_state_dict``, which bump
    ``weight._version``; a change through ``weight.data`` does not, so call `refresh_` after one, e.g. after
    ``layer.weight.data.mul_(2)``: the layer cannot see it without checking the whole weight on every call).
    ``mode`` is ``"bsr"`` or ``"dense"``: `calibrate_` (run by `from_linear`) times ``F.linear`` against
    ``(W_bsr @ x.T).T`` and picks ``"bsr"`` only if it was at least ``min_speedup`` times faster on every
    example input (warm-cache timings of the layer alone; in a large model at batch 1 the weight comes from
    memory on every call, where both kernels are slower and closer). Either way the output equals
    ``F.linear(x, weight, bias)`` up to float rounding. Where autograd needs a graph through the layer (grad
    mode and an input or parameter that requires grad), the dense path runs, since the BSR kernel has no
    backward on CPU. Kernels without a BSR implementation (e.g. bfloat16 on CPU) fall back to dense at
    calibration. A change of dtype or device (``.to(...)``, ``.half()``, ``.cuda()``) sets ``mode`` back to
    ``"dense"`` and clears ``measured``: call `calibrate_` (or `force_`) again on the new dtype / device.

    Args:
        in_features: Input size, divisible by the block.
        out_features: Output size, divisible by the block.
        bias: Whether to hold a bias.
        block: ``b`` or ``(b_out, b_in)``, the BSR block size.
        mode: Initial mode, ``"dense"`` (default) or ``"bsr"``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Examples:
        >>> layer = BlockSparseLinear.from_linear(nn.Linear(768, 3072), block=32, sparsity=0.9)
        >>> layer.mode in ("bsr", "dense")
        True
        >>> layer(torch.randn(1, 197, 768)).shape
        torch.Size([1, 197, 3072])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block: int | Sequence[int] = 32,
        mode: Literal["bsr", "dense"] = "dense",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.block = _pair(block)
        if out_features % self.block[0] or in_features % self.block[1]:
            raise ConfigError(
                f"BlockSparseLinear: weight shape {(out_features, in_features)} is not divisible by the block "
                f"{self.block}"
            )
        if mode not in _MODES:
            raise ConfigError(f"BlockSparseLinear: mode must be 'bsr' or 'dense', got {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.mode: str = mode
        #: Median dense / bsr time ratio per calibration input shape (empty until `calibrate_` ran).
        self.measured: dict[tuple[int, ...], float] = {}
        self._bsr_cache: tuple[tuple[Any, ...], Tensor] | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block: int | Sequence[int] = 32,
        sparsity: float | None = 0.9,
        score: Literal["l1", "l2"] = "l1",
        *,
        force: Literal["bsr", "dense"] | None = None,
        x_example: Tensor | Sequence[Tensor] | None = None,
        rounds: int = 15,
        min_speedup: float = 1.05,
        cache: Literal["warm", "cold"] = "warm",
    ) -> BlockSparseLinear:
        """A `BlockSparseLinear` with ``linear``'s weight, its lowest-norm blocks removed, and a measured mode.

        ``linear`` is not changed (its tensors are copied).

        Args:
            linear: A ``nn.Linear`` (or subclass; only ``weight`` and ``bias`` are read, and a `MaskedLinear`'s
                ``masked_weight()`` instead of its raw ``weight``).
            block: ``b`` or ``(b_out, b_in)``.
            sparsity: Fraction of blocks removed (see `block_mask`); ``None`` keeps the weight as it is (for a
                weight already block-pruned: all-zero blocks are left out of the BSR tensor).
            score: Block norm, ``"l1"`` or ``"l2"``.
            force: ``"bsr"`` or ``"dense"`` sets the mode without measuring; ``"bsr"`` raises if the BSR kernel
                fails for this dtype / device.
            x_example: Input(s) to time on, (..., in); default (1, 1, in) and (1, 197, in), random.
            rounds: Timed rounds per input in `calibrate_`.
            min_speedup: The sparse kernel must be at least this many times faster on every input.
            cache: Timing regime of `calibrate_`, ``"warm"`` or ``"cold"``.
        """
        w = used_weight(linear)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block=block,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            weight = w if sparsity is None else w * block_mask(w, layer.block, sparsity, score)
            layer.weight.copy_(weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        if force is not None:
            return layer.force_(force)
        return layer.calibrate_(x_example, rounds=rounds, min_speedup=min_speedup, cache=cache)

    def _bsr(self) -> Tensor:
        w = self.weight
        key = (id(w), w._version, w.data_ptr(), w.dtype, w.device)
        if self._bsr_cache is None or self._bsr_cache[0] != key:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
                self._bsr_cache = (key, w.detach().to_sparse_bsr(self.block))
        return self._bsr_cache[1]

    def _forward_bsr(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).T  # (in, M)
        wb = self._bsr()
        y = wb @ x2 if self.bias is None else torch.addmm(self.bias.unsqueeze(1), wb, x2)  # (out, M)
        return y.T.reshape(*x.shape[:-1], self.out_features)

    def _forward_dense(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features); the BSR output is a transposed view (not contiguous)."""
        if self.mode != "bsr" or (torch.is_grad_enabled() and (x.requires_grad or self._params_need_grad())):
            return F.linear(x, self.weight, self.bias)
        return self._forward_bsr(x)

    def _params_need_grad(self) -> bool:
        return self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    def force_(self, mode: Literal["bsr", "dense"]) -> BlockSparseLinear:
        """Set ``mode`` without measuring and return ``self``; ``"bsr"`` checks that the BSR kernel runs."""
        if mode not in _MODES:
            raise ConfigError(f"BlockSparseLinear: mode must be 'bsr' or 'dense', got {mode!r}")
        if mode == "bsr":
            try:
                x = torch.zeros(1, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
                with torch.inference_mode():
                    self._forward_bsr(x)
            except RuntimeError as e:
                raise DynsparseError(
                    f"BlockSparseLinear: the BSR kernel fails for {self.weight.dtype} on {self.weight.device}: {e}"
                ) from e
        self.mode = mode
        return self

    def calibrate_(
        self,
        x_example: Tensor | Sequence[Tensor] | None = None,
        rounds: int = 15,
        warmup: int = 3,
        min_speedup: float = 1.05,
        cache: Literal["warm", "cold"] = "warm",
    ) -> BlockSparseLinear:
        """Time dense against BSR on this machine, set ``mode`` and return ``self``.

        On one intra-op thread (restored afterwards) and under ``torch.inference_mode()``: ``warmup`` untimed
        calls of each, then ``rounds`` rounds timing both, the order alternating. The speed-up on an input is
        the median of the per-round ratios dense / bsr (stored in ``measured``); ``mode`` becomes ``"bsr"``
        only if on every input that median reached ``min_speedup`` and the lower quartile of the ratios
        reached 1.

        ``cache="warm"`` (default) times repeated calls with the weight in the CPU caches; ``"cold"`` times
        single calls after flushing them (64 MiB written), as a layer runs inside a model larger than the
        caches. With few tokens the dense kernel is memory-bound, so cold timings favour BSR (on the reference
        machine, 768 -> 3072 at 50 % block sparsity and one token: 0.4x warm, 1.2x cold); warm is the
        cautious choice, BSR winning warm wins cold too.

        Args:
            x_example: Input(s) (..., in_features); default random (1, 1, in) and (1, 197, in).
            rounds: Timed rounds per input.
            warmup: Untimed rounds first.
            min_speedup: Required speed-up of BSR over dense on every input.
            cache: ``"warm"`` or ``"cold"``, see above.
        """
        if cache not in ("warm", "cold"):
            raise ConfigError(f"calibrate_: cache must be 'warm' or 'cold', got {cache!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
            raise ConfigError(f"calibrate_: rounds must be an integer >= 2, got {rounds!r}")
        kw = {"dtype": self.weight.dtype, "device": self.weight.device}
        if x_example is None:
            examples = [torch.randn(1, 1, self.in_features, **kw), torch.randn(1, 197, self.in_features, **kw)]
        elif isinstance(x_example, Tensor):
            examples = [x_example]
        else:
            examples = list(x_example)
        for x in examples:
            if x.shape[-1:] != (self.in_features,):
                raise ConfigError(
                    f"calibrate_: example input of shape {tuple(x.shape)}, need (..., {self.in_features})"
                )
        self.measured = {}
        faster = True
        try:
            with torch.inference_mode():
                self._forward_bsr(examples[0])
        except RuntimeError as e:
            log.info("BlockSparseLinear: BSR kernel unavailable (%s); using dense", e)
            self.mode = "dense"
            return self
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for x in examples:
                    x = x.detach()
                    ratios = _time_pair(
                        lambda x=x: self._forward_dense(x), lambda x=x: self._forward_bsr(x), rounds, warmup, cache
                    )
                    q1, median, _ = statistics.quantiles(ratios, n=4, method="inclusive")
                    self.measured[tuple(x.shape)] = median
                    faster = faster and median >= min_speedup and q1 >= 1.0
        finally:
            torch.set_num_threads(threads)
        self.mode = "bsr" if faster else "dense"
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BlockSparseLinear:
        # `.to(...)`, `.half()`, `.cuda()`, ...: a mode measured (or forced) for one dtype and device says nothing
        # about another, where the BSR kernel may be slower or missing (half / bfloat16 on CPU): back to dense
        before = (self.weight.dtype, self.weight.device)
        super()._apply(fn, recurse)
        if (self.weight.dtype, self.weight.device) != before:
            if self.mode == "bsr":
                log.info(
                    "BlockSparseLinear: moved from %s on %s to %s on %s; mode back to 'dense' (run calibrate_ again)",
                    *before,
                    self.weight.dtype,
                    self.weight.device,
                )
            self.mode, self.measured, self._bsr_cache = "dense", {}, None
        return self

    def refresh_(self) -> BlockSparseLinear:
        """Drop the BSR copy of the weight (rebuilt on the next BSR call) and return ``self``.

        Needed only after the weight changed in a way its version counter does not record, i.e. through
        ``weight.data``.
        """
        self._bsr_cache = None
        return self

    def sparsity(self) -> float:
        """Fraction of all-zero blocks of the weight."""
        s = block_scores(self.weight, self.block, "l1")
        return 1.0 - int(s.count_nonzero()) / s.numel()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (trainable) holding copies of the masked weight and the bias."""
        w = self.weight.detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.detach())
        return lin

    def extra_repr(self) -> str:
        speed = ""
        if self.measured:
            speed = " (measured " + ", ".join(f"{r:.2f}x" for r in self.measured.values()) + ")"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block={self.block}, sparsity={self.sparsity():.4f}, mode={self.mode}{speed}"
        )

    def __getstate__(self) -> dict[str, Any]:
        # a sparse BSR tensor cannot be deep-copied or pickled; it is rebuilt on first use
        state = self.__dict__.copy()
        state["_bsr_cache"] = None
        return state

"""Latency of several models side by side: warm-up, interleaved rounds, medians of paired ratios."""

from __future__ import annotations

import gc
import numbers
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..modules import modes_kept

__all__ = ["LatencyResult", "compare_latency"]


@dataclass(frozen=True)
class LatencyResult:
    """Median seconds per forward of each model, and the median paired speed-up of each over ``reference``."""

    threads: int
    batch: int
    rounds: int
    median_s: dict[str, float]
    speedup: dict[str, float]

    def __str__(self) -> str:
        parts = [f"{k}: {1e3 * v:.2f} ms (x{self.speedup[k]:.2f})" for k, v in self.median_s.items()]
        return f"batch {self.batch}, {self.threads} thread(s), {self.rounds} rounds: " + ", ".join(parts)


def compare_latency(
    models: Mapping[str, nn.Module],
    x: Tensor,
    *,
    reference: str | None = None,
    rounds: int = 15,
    warmup: int = 3,
    threads: int = 1,
) -> LatencyResult:
    """Time one forward of each model on ``x`` under ``torch.inference_mode``, interleaved round by round.

    The order of the models rotates every round; the speed-up of model ``m`` is the median over rounds of
    ``t_reference / t_m`` measured in the same round. ``torch.set_num_threads(threads)`` is set for the
    measurement and restored afterwards, and so is the training flag of each model and of each of its submodules (a
    model fine-tuned with frozen BatchNorm keeps it frozen). Python's cyclic garbage collector
    runs once before the timed rounds and is off during them (restored afterwards), so a collection triggered by
    one model's allocations is never charged to whichever model happens to run next. On a CUDA ``x`` each timed
    forward is bracketed by `torch.cuda.synchronize` (kernels run asynchronously: the launch alone is not the time).

    Raises:
        ConfigError: ``rounds`` or ``threads`` is below 1, ``warmup`` below 0, ``models`` is empty, ``reference``
            is not one of them, or ``x`` is not a non-empty batch.
    """
    _check_args(models, reference, rounds, warmup, threads)
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(
            f"compare_latency: x must be a non-empty batch (a tensor of shape (B, ...), B >= 1), got {got}"
        )
    rounds, warmup, threads = int(rounds), int(warmup), int(threads)  # a numpy int is one too
    names = list(models)
    reference = reference or names[0]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    try:
        with modes_kept(*models.values()):
            for m in models.values():
                m.eval()
            with torch.inference_mode():
                for _ in range(warmup):
                    for n in names:
                        models[n](x)
                gc.collect()
                gc.disable()
                sync = torch.cuda.synchronize if x.device.type == "cuda" else _no_sync
                for r in range(rounds):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for n in order:
                        sync()
                        t0 = time.perf_counter()
                        models[n](x)
                        sync()
                        times[n].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
        torch.set_num_threads(old)
    med = {n: statistics.median(v) for n, v in times.items()}
    speed = {n: statistics.median([a / b for a, b in zip(times[reference], times[n], strict=True)]) for n in names}
    return LatencyResult(threads, int(x.shape[0]), rounds, med, speed)


def _no_sync() -> None:
    """CPU ops have finished when they return."""


def _check_args(models: Mapping[str, nn.Module], reference: str | None, rounds: int, warmup: int, threads: int) -> None:
    for name, v, low in (("rounds", rounds, 1), ("threads", threads, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:  # as knob_curve checks them
            raise ConfigError(f"compare_latency: {name} must be an int >= {low}, got {v!r}")
    if not models:
        raise ConfigError("compare_latency: no models to time")
    if reference is not None and reference not in models:
        raise ConfigError(f"compare_latency: reference {reference!r} is not one of the models {list(models)}")

"""The speed / accuracy curve of the run-time knob: accuracy, FLOPs and measured latency at each budget."""

from __future__ import annotations

import numbers
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["KnobCurve", "KnobPoint", "knob_curve"]


@dataclass(frozen=True)
class KnobPoint:
    """One budget: the metric, the FLOPs relative to dense, and the measured and ideal speed-up per batch size.

    ``flops_ratio`` is the mean over the ``flops_images`` inputs; ``ideal[b]`` is dense FLOPs over the model's FLOPs
    on exactly the ``b`` inputs timed at batch ``b`` (an input-dependent model spends different FLOPs on each input,
    so a batch of one is not the average).
    """

    keep: float | None
    metric: float
    flops_ratio: float
    latency_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    ideal: dict[int, float] = field(default_factory=dict)


@dataclass
class KnobCurve:
    """Points of `knob_curve`, with the dense model's metric and latency."""

    points: list[KnobPoint]
    dense_metric: float
    dense_ms: dict[int, float]
    threads: int
    rounds: int

    def table(self) -> str:
        """A markdown table, one row per budget (and one for the dense model).

        ``bB ideal`` is the FLOPs-ideal speed-up of the inputs timed at batch ``B`` (see `KnobPoint`).
        """
        batches = sorted(self.dense_ms)
        head = ["keep", "metric", "FLOPs vs dense", *[f"b{b} ms (speed-up)" for b in batches]]
        head += [f"b{b} ideal" for b in batches]
        rows = [["dense", f"{self.dense_metric:.4f}", "100.0%", *[f"{self.dense_ms[b]:.2f}" for b in batches]]]
        rows[0] += ["1.00x"] * len(batches)
        for p in self.points:
            cells = [f"{p.latency_ms[b]:.2f} ({p.speedup[b]:.2f}x)" for b in batches]
            cells += [f"{p.ideal[b]:.2f}x" if b in p.ideal else "n/a" for b in batches]
            rows.append([_keep_label(p.keep), f"{p.metric:.4f}", f"{100 * p.flops_ratio:.1f}%", *cells])
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    def plot(self, path: str | Path, title: str = "run-time knob", ylabel: str = "test accuracy") -> Path:
        """PNG: metric against measured speed-up over dense (one line per batch size), keep values annotated."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for b in sorted(self.dense_ms):
            xs = [p.speedup[b] for p in self.points]
            ax.plot(xs, [p.metric for p in self.points], marker="o", label=f"batch {b}")
            if b == min(self.dense_ms):
                for p, xv in zip(self.points, xs, strict=True):
                    ax.annotate(
                        f"keep {_keep_label(p.keep)}",
                        (xv, p.metric),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.axhline(self.dense_metric, color="grey", ls="--", lw=1, label="dense")
        ax.set_xlabel(f"measured speed-up over dense ({self.threads} thread)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def knob_curve(
    model: nn.Module,
    dense: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    x: Tensor,
    *,
    keeps: Sequence[float | None] = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2),
    batch_sizes: Sequence[int] = (1, 32),
    rounds: int = 15,
    threads: int = 1,
    flops_images: int = 64,
) -> KnobCurve:
    """Sweep `dynsparse.set_budget_` over ``keeps``: metric, FLOPs and latency against ``dense`` at each budget.

    Latency is measured side by side with the dense model in one process (`compare_latency`: interleaved
    rounds, median of paired ratios). The model's budget is restored afterwards.

    Args:
        model: A model with input-dependent gates (e.g. token gates), in eval mode.
        dense: The dense reference.
        eval_fn: ``eval_fn(model) -> float`` (e.g. test accuracy).
        x: Real inputs, at least ``max(batch_sizes)`` of them (the first ``b`` are timed at batch ``b``, so the
            inputs of a batch make their own decisions).
        keeps: Budgets to try (``None``: gates with learned thresholds use them, see `dynsparse.set_budget_`).
        batch_sizes: Batch sizes timed.
        rounds: Interleaved timing rounds.
        threads: ``torch.set_num_threads`` while timing.
        flops_images: FLOPs per image are counted on each of the first ``flops_images`` inputs alone (batch 1)
            and averaged: an input-dependent model (routers, thresholds) spends different FLOPs on each. The
            FLOPs-ideal speed-up of each batch size is counted on the inputs timed at it (``KnobPoint.ideal``).

    Raises:
        ConfigError: ``keeps`` or ``batch_sizes`` is empty; a batch size, ``rounds``, ``threads`` or
            ``flops_images`` is not an int >= 1; a batch size repeats; ``x`` has fewer inputs than the largest
            batch size; the dense model counts no FLOPs. A budget a gate refuses raises from `set_budget_`.
    """
    from ..flops import count_flops
    from ..knob import budget
    from .latency import compare_latency

    _check_args(x, keeps, batch_sizes, rounds, threads, flops_images)
    model.eval()
    dense.eval()
    n_mean = min(flops_images, len(x))
    n_count = max(n_mean, max(batch_sizes))  # the inputs averaged and those timed, each counted alone

    def per_input(m: nn.Module) -> list[int]:
        return [count_flops(m, x[i : i + 1]) for i in range(n_count)]

    dense_each = per_input(dense)
    dense_flops = sum(dense_each[:n_mean]) / n_mean
    if not dense_flops:
        raise ConfigError(f"knob_curve: the dense {type(dense).__name__} counts 0 FLOPs on x; no FLOPs ratio to report")
    dense_ms: dict[int, list[float]] = {b: [] for b in batch_sizes}
    points = []
    for keep in keeps:
        with budget(model, keep):
            with torch.no_grad():
                metric = float(eval_fn(model))
                each = per_input(model)
                flops = sum(each[:n_mean]) / n_mean / dense_flops
            lat, spd = {}, {}
            ideal = {b: sum(dense_each[:b]) / sum(each[:b]) if sum(each[:b]) else float("inf") for b in batch_sizes}
            for b in batch_sizes:
                xb = x[:b].contiguous()
                res = compare_latency({"dense": dense, "model": model}, xb, rounds=rounds, threads=threads)
                lat[b], spd[b] = 1e3 * res.median_s["model"], res.speedup["model"]
                dense_ms[b].append(1e3 * res.median_s["dense"])
        points.append(KnobPoint(keep, metric, flops, lat, spd, ideal))
    with torch.no_grad():
        dense_metric = float(eval_fn(dense))
    med = {b: statistics.median(v) for b, v in dense_ms.items()}  # over the budgets' paired runs
    return KnobCurve(points, dense_metric, med, threads, rounds)


def _check_args(
    x: Tensor, keeps: Sequence[float | None], batch_sizes: Sequence[int], rounds: int, threads: int, flops_images: int
) -> None:
    """Refuse bad arguments before anything runs (``ConfigError`` naming the argument)."""
    for name, v in (("rounds", rounds), ("threads", threads), ("flops_images", flops_images)):
        if not _is_count(v):
            raise ConfigError(f"knob_curve: {name} must be an int >= 1, got {v!r}")
    for name, seq in (("keeps", keeps), ("batch_sizes", batch_sizes)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or not seq:
            raise ConfigError(f"knob_curve: {name} must be a non-empty sequence, got {seq!r}")
    bad = [b for b in batch_sizes if not _is_count(b)]
    if bad:
        raise ConfigError(f"knob_curve: batch_sizes must be ints >= 1, got {bad[0]!r} in {list(batch_sizes)}")
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ConfigError(f"knob_curve: batch_sizes repeats a batch size: {list(batch_sizes)}")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ConfigError(f"knob_curve: x must be a batch of inputs (a tensor with a batch dimension), got {x!r:.80}")
    if len(x) < max(batch_sizes):
        raise ConfigError(f"knob_curve: x has {len(x)} inputs, fewer than the largest batch size {max(batch_sizes)}")


def _keep_label(keep: object) -> str:
    """``0.5`` -> ``"0.5"``; ``None`` (a threshold gate on its learned thresholds) -> ``"learned"``."""
    if keep is None:
        return "learned"
    return f"{keep:g}" if isinstance(keep, numbers.Real) else str(keep)


def _is_count(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1

"""Timing helpers shared by the benchmark scripts: interleaved paired rounds, robust summaries, markdown.

Not part of the package: benchmarks are scripts, run by hand (``python benchmarks/<name>.py``), never by the
test suite. The method is built for a small, shared, noisy machine:

* every variant is warmed up before anything is timed;
* variants run interleaved, one step each per round, and the order rotates every round, so a slow spell of
  the machine hits all variants alike instead of whichever happened to run during it;
* results are ratios *within* a round (paired), summarised by their median and interquartile range,
  which ignore the odd round disturbed by another process;
* each step is timed by the wall clock and by the process's CPU time; the latter leaves out the time the
  process sat waiting while other processes ran.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "Spread",
    "Timings",
    "add_memory_options",
    "apply_memory_options",
    "count_flops",
    "interleaved_rounds",
    "keep_freed_memory",
    "markdown_table",
    "paired_ratios",
    "speed_cells",
    "spread",
]


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of a sample."""

    median: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def spread(values: Sequence[float]) -> Spread:
    """Median and first / third quartiles (inclusive method, so two values are enough)."""
    if not values:
        raise ValueError("spread() needs at least one value")
    if len(values) == 1:
        v = float(values[0])
        return Spread(v, v, v)
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(med, q1, q3)


@dataclass(frozen=True)
class Timings:
    """Per-round seconds of each variant, by two clocks; entry ``i`` of every list comes from round ``i``.

    ``wall`` is elapsed time (``time.perf_counter``). ``cpu`` is the CPU time of this process
    (``time.process_time``, all its threads): it leaves out the time the process waited while other processes
    ran, so on a shared machine it measures the work of a step far more stably than ``wall``.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleaved_rounds(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 3,
    on_round: Callable[[int, dict[str, float], dict[str, float]], None] | None = None,
) -> Timings:
    """Time ``steps`` side by side: per round, each step once, in an order that rotates every round.

    Args:
        steps: ``{variant: step}``; a step runs one unit of work (e.g. one training step) and returns when done.
        rounds: Timed rounds.
        warmup: Untimed rounds first (allocator, lazy init, caches).
        on_round: Called after each timed round with ``(round_index, wall, cpu)``, both ``{variant: seconds}``.

    Returns:
        The wall-clock and CPU seconds of every step.

    The garbage collector runs between steps, never inside a timed one.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    out = Timings({name: [] for name in names}, {name: [] for name in names})
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            wall, cpu = {}, {}
            for name in order:
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                steps[name]()
                wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            for name in names:
                out.wall[name].append(wall[name])
                out.cpu[name].append(cpu[name])
            if on_round is not None:
                on_round(r, wall, cpu)
    finally:
        if was_enabled:
            gc.enable()
    return out


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios ``numerator[i] / denominator[i]`` of two variants timed in the same rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired_ratios: {len(numerator)} vs {len(denominator)} rounds")
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def speed_cells(t: Timings, ideal: float, *, base: str = "dense", variant: str = "dyn", reps: int = 1, digits: int = 1):
    """The speed columns of a dense-vs-variant row, from interleaved rounds ``t``.

    ``[base ms, variant ms, wall speed-up (IQR), CPU-time speed-up, FLOPs-ideal, achieved / ideal]``: medians of
    the per-round times (divided by ``reps`` calls per round, with ``digits`` decimals) and of the paired ratios.
    """
    wall = spread(paired_ratios(t.wall[base], t.wall[variant]))
    cpu = spread(paired_ratios(t.cpu[base], t.cpu[variant]))
    return [
        f"{1e3 * spread(t.wall[base]).median / reps:.{digits}f}",
        f"{1e3 * spread(t.wall[variant]).median / reps:.{digits}f}",
        f"{wall.median:.2f}x ({wall.q1:.2f}-{wall.q3:.2f})",
        f"{cpu.median:.2f}x",
        f"{ideal:.2f}x",
        f"{wall.median / ideal:.2f}",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub-flavoured markdown table.

    Args:
        header: Column titles.
        rows: Cells, converted with ``str``.
        align: One letter per column, ``"l"`` or ``"r"``; missing letters mean left.
    """
    marks = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def count_flops(model, *inputs) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (see ``dynsparse.flops.count_flops``).

    ``FlopCounterMode`` counts matrix products and convolutions (2 FLOPs per multiply-add), not element-wise
    ops or norms; dynsparse adds the formula for the CPU kernel of fused attention, which it lacks.
    """
    from dynsparse.flops import count_flops as _count

    return _count(model, *inputs)


def keep_freed_memory() -> None:
    """Make glibc's ``malloc`` keep freed memory in the process and reuse it (``mallopt``), for the whole process.

    By default glibc serves every large block (above its mmap threshold, at most 32 MiB) with a fresh ``mmap`` and
    returns it to the kernel on ``free``. A CNN forward at batch 32 allocates activations of up to ~100 MB (and
    oneDNN's layout-reorder buffers of the same size), so every forward page-faults and zero-fills them again:
    kernel time that does not depend on the FLOPs and that is the same for a dense and a pruned model. With
    ``M_MMAP_MAX = 0`` (no mmap) and ``M_TRIM_THRESHOLD = 2**31 - 1`` (no trimming) freed blocks stay in the
    heap and the next forward reuses them, as a caching allocator (jemalloc, tcmalloc) would. Call it once, before
    building the models; it applies to every model in the process alike.

    Raises:
        OSError: the C library is not glibc (no ``mallopt``) or refused a setting.
    """
    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        raise OSError(f"{name} has no mallopt (not glibc)")
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)):
        if libc.mallopt(option, value) != 1:
            raise OSError(f"mallopt({option}, {value}) failed")


def add_memory_options(parser) -> None:
    """``--channels-last`` and ``--malloc glibc|keep``: the layout and allocator options the CNN benchmarks share."""
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="every model and the inputs in torch.channels_last (default: the default NCHW layout)",
    )
    parser.add_argument(
        "--malloc",
        choices=("glibc", "keep"),
        default="glibc",
        help="glibc: glibc's defaults; keep: freed memory stays in the process for reuse, for every model alike",
    )


def apply_memory_options(args) -> torch.memory_format:
    """Act on `add_memory_options` (call before building any model); returns the memory format to use."""
    import torch

    if args.malloc == "keep":
        keep_freed_memory()
    return torch.channels_last if args.channels_last else torch.contiguous_format

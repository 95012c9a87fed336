"""Block-sparse Linear (torch BSR kernel) against dense ``F.linear`` on CPU, at 50 / 80 / 90 / 95 % block sparsity.

Run from the repository root (about three minutes with the defaults, on one thread)::

    python benchmarks/block_sparse.py
    python benchmarks/block_sparse.py --sparsities 0.9 --tokens 197 --rounds 60 --block 16 --calibrate cold

Cases: a ViT-B MLP's two Linear layers, 768 -> 3072 (``fc1``) and 3072 -> 768 (``fc2``), fp32, random weights
(seed 0) with the lowest-L1 ``block`` x ``block`` blocks removed (``dynsparse.prune.block_mask``), input
(1, 1, in) and (1, 197, in). Four variants run side by side in one process, compared in two pairs:

* ``BSR kernel`` against ``F.linear``: ``(W_bsr @ x.T).T + b`` with ``W_bsr = W_masked.to_sparse_bsr((block,
  block))`` (built once) against ``F.linear(x, W_masked, b)``, two bare function calls;
* ``BlockSparseLinear`` against ``nn.Linear``: ``BlockSparseLinear.from_linear(..., x_example=x)`` against the
  ``nn.Linear`` holding ``W_masked`` that it replaces, two module calls (a module call costs a few
  microseconds, ~4 % of a 0.18 ms one-token call). ``from_linear`` times both kernels on that input when it is
  built and keeps BSR only where it was faster (median >= 1.05x, lower quartile >= 1x), dense otherwise;
  ``--calibrate`` picks the regime it times in (default ``warm``).

Method: one intra-op thread, ``torch.inference_mode()``, 3 warm-up calls of every variant, then rounds of one
sample of each variant, the order rotating every round; the garbage collector is off while timing. Two regimes,
timed separately:

* ``warm``: a sample runs its call untimed for about 3 ms, then times as many calls again (the same count for
  every variant of a case): the weight sits in the CPU caches, as in a micro-benchmark. Without the untimed
  calls a variant would pay for the previous one having evicted its weight (a dense 768x3072 GEMV needs ~6 calls
  to get back to speed after a BSR call on the reference machine).
* ``cold``: a sample times one call right after writing 64 MiB of memory: the weight comes from DRAM, as when
  the layer runs once per forward inside a model larger than the caches (batch-1 inference of a ViT-B).

The speed-up of a variant is the median over rounds of the paired ratio dense / variant, with its
interquartile range, by wall clock (and, as a check, by process CPU time, which leaves out the time this
process waited for other processes).

This is a benchmark, not a test: it asserts nothing about speed. Targets: >= 1.5x for the BSR kernel at 90 %, and
BlockSparseLinear never slower than dense (~1.0x where it falls back).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from _timing import Spread, Timings, markdown_table, paired_ratios, spread
from torch import nn

from dynsparse.commands.args import positive_int
from dynsparse.prune import EVICT_BYTES, BlockSparseLinear, block_mask

LAYERS = {"fc1": (768, 3072), "fc2": (3072, 768)}
MIN_SECONDS = 3e-3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt(s: Spread) -> str:
    return f"{s.median:.2f}x ({s.q1:.2f}-{s.q3:.2f})"


def measure(fns: Mapping[str, Callable[[], object]], rounds: int, cache: str) -> tuple[Timings, int]:
    """Per-round seconds per call of each variant in one regime (see the module docstring), and calls per sample."""
    names = list(fns)
    best = dict.fromkeys(names, math.inf)
    for _ in range(3):
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    if cache == "warm":
        reps = max(1, math.ceil(MIN_SECONDS / min(best.values())))
        pre, evict = reps, None
    else:
        reps, pre, evict = 1, 0, torch.zeros(EVICT_BYTES // 4)
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    gc.collect()  # once: a collection takes ~0.1 s here, and the timed calls make no cyclic garbage
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn = fns[name]
                if evict is not None:
                    evict.add_(1.0)
                for _ in range(pre):
                    fn()
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(reps):
                    fn()
                out.wall[name].append((time.perf_counter() - t0) / reps)
                out.cpu[name].append((time.process_time() - c0) / reps)
    finally:
        gc.enable()
    return out, reps


def run_case(in_f: int, out_f: int, sparsity: float, tokens: int, block: int, rounds: int, calibrate: str) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(block_mask(lin.weight, block, sparsity))
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(1, tokens, in_f)
    layer = BlockSparseLinear.from_linear(lin, block=block, sparsity=None, x_example=x, cache=calibrate)
    with torch.inference_mode():
        w_bsr = w.to_sparse_bsr((block, block))
        x2 = x.reshape(-1, in_f)
        fns = {
            "dense": lambda: F.linear(x, w, b),
            "bsr": lambda: ((w_bsr @ x2.T).T + b).reshape(1, tokens, out_f),
            "linear": lambda: lin(x),
            "module": lambda: layer(x),
        }
        ref = fns["dense"]()
        for name, fn in fns.items():  # every variant computes the same thing
            torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        res = {"mode": layer.mode, "calibrated": next(iter(layer.measured.values()), float("nan"))}
        for cache in ("warm", "cold"):
            t, reps = measure(fns, rounds, cache)
            res[cache] = {"dense_ms": spread(t.wall["dense"]).median * 1e3, "reps": reps}
            for base, k in (("dense", "bsr"), ("linear", "module")):
                res[cache][k] = spread(paired_ratios(t.wall[base], t.wall[k]))
                res[cache][f"{k}_cpu"] = spread(paired_ratios(t.cpu[base], t.cpu[k]))
    return res


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 197])
    p.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    p.add_argument("--block", type=positive_int, default=32)
    p.add_argument("--rounds", type=positive_int, default=40)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--calibrate", choices=["warm", "cold"], default="warm", help="BlockSparseLinear's timing regime")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows: dict[str, list[list[str]]] = {"warm": [], "cold": []}
    for name in args.layers:
        in_f, out_f = LAYERS[name]
        for tokens in args.tokens:
            for s in args.sparsities:
                r = run_case(in_f, out_f, s, tokens, args.block, args.rounds, args.calibrate)
                for cache, row in rows.items():
                    c = r[cache]
                    log(
                        f"{name} tokens={tokens} sparsity={s:.2f} {cache}: bsr {fmt(c['bsr'])}, "
                        f"{r['mode']} {fmt(c['module'])}"
                    )
                    row.append(
                        [
                            f"{name} {in_f}->{out_f}",
                            f"(1, {tokens}, {in_f})",
                            f"{s:.0%}",
                            f"{c['dense_ms']:.3f}",
                            fmt(c["bsr"]),
                            f"{c['bsr_cpu'].median:.2f}x",
                            f"{r['mode']} ({r['calibrated']:.2f}x)",
                            fmt(c["module"]),
                            f"{c['module_cpu'].median:.2f}x",
                        ]
                    )
    print(
        f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"block {args.block}x{args.block}, fp32, inference_mode, {args.rounds} rounds, "
        f"BlockSparseLinear calibrated {args.calibrate}, {time.perf_counter() - start:.0f} s"
    )
    header = [
        "layer",
        "input",
        "block sparsity",
        "F.linear ms",
        "BSR kernel speed-up over F.linear, wall (IQR)",
        "same, CPU",
        "BlockSparseLinear mode (calibrated speed-up)",
        "BlockSparseLinear speed-up over nn.Linear, wall (IQR)",
        "same, CPU",
    ]
    titles = {
        "warm": "Warm cache (repeated calls, weight in the CPU caches)",
        "cold": "Cold cache (one call after flushing the caches, as inside a large model at batch 1)",
    }
    for cache, row in rows.items():
        print(f"\n{titles[cache]}\n")
        print(markdown_table(header, row, align="lllrrrlrr"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

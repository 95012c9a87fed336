"""Wall-clock time of ``dynsparse.convert`` on ``vit_base_patch16_224`` (CPU, one thread).

Run from the repository root (about half a minute)::

    python benchmarks/convert_time.py
    python benchmarks/convert_time.py --repeats 11 --verify

The model is ``vit_base_patch16_224`` (``pretrained=False``, seed 0, 86.6 M parameters) with fixed gates on
``heads`` (12 per block), ``neurons`` (3072 per block) and ``layers`` (the two residual branches of each block),
set by ``fix_gates_`` to seeded random keep masks: every unit and every branch is kept with probability 0.5, so
about half of the heads and neurons are sliced out and about half of the branches are removed (a block with both
branches closed becomes ``nn.Identity``, one with one closed branch keeps a ``ZeroBranch``).

Timed: one call of ``ds.convert(model)`` (deep copy, slicing, folding, branch removal, the clean-up check, the
slice plan), by ``time.perf_counter``. The first call of the process is reported on its own (cold: first use of
code paths and allocator); then ``--repeats`` further calls, summarised by their median, minimum and maximum.
The garbage collector runs between calls, never inside one. With ``--verify`` every call also checks the
converted model against the gated one on one 224x224 image (``verify_inputs=``), which adds two forward passes.

The target of the issue is "conversion time of vit_base_patch16_224 under 2 seconds on this machine"; the last
line says whether the median met it. This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import timm
import torch

import dynsparse as ds

MODEL = "vit_base_patch16_224"
KEEP_PROBABILITY = 0.5
TARGET_S = 2.0
FIXED = {"gate": "fixed"}


def gated_model(seed: int = 0) -> tuple[torch.nn.Module, int, int]:
    """The gated ViT-B/16 with fixed random keep masks; returns ``(model, units kept, units in total)``."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False).eval()
    ds.sparsify_(model, {"heads": FIXED, "neurons": FIXED, "layers": FIXED})
    gen = torch.Generator().manual_seed(seed)
    masks = {name: torch.rand(g.num_units, generator=gen) < KEEP_PROBABILITY for name, g in ds.named_gates(model)}
    ds.fix_gates_(model, masks)
    return model, sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())


def time_convert(model: torch.nn.Module, verify_inputs: torch.Tensor | None) -> tuple[float, torch.nn.Module]:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        small = ds.convert(model, verify_inputs=verify_inputs)
        return time.perf_counter() - t0, small
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the first one (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--verify", action="store_true", help="also check each result on one image (verify_inputs=)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be positive")

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, dynsparse {ds.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
        f"{torch.get_num_threads()} intra-op thread(s); verify_inputs: {'1x3x224x224' if args.verify else 'none'}",
        flush=True,
    )
    t0 = time.perf_counter()
    model, kept, total = gated_model()
    dense = sum(p.numel() for n, p in model.named_parameters() if ".gate." not in n)
    print(f"{MODEL}: built and gated in {time.perf_counter() - t0:.2f} s; {kept} of {total} units kept", flush=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) if args.verify else None

    cold, small = time_convert(model, x)
    n = sum(p.numel() for p in small.parameters())
    removed = sum(isinstance(b, torch.nn.Identity) for b in small.blocks)
    zero = sum(isinstance(m, ds.ZeroBranch) for m in small.modules())
    print(
        f"converted: {dense / 1e6:.1f} M -> {n / 1e6:.1f} M parameters; "
        f"{removed} of {len(small.blocks)} blocks removed, {zero} ZeroBranch"
    )
    del small
    print(f"first (cold) conversion: {cold:.3f} s", flush=True)
    times = []
    for _ in range(args.repeats):
        t, small = time_convert(model, x)
        del small
        times.append(t)
    med = statistics.median(times)
    print(f"next {args.repeats} conversions: " + ", ".join(f"{t:.3f}" for t in times) + " s")
    print(f"median {med:.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    worst = max(cold, med)
    verdict = "met" if worst < TARGET_S else "missed"
    print(f"target < {TARGET_S:.0f} s: {verdict} (cold {cold:.2f} s, median {med:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

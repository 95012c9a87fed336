"""Training-step time of hard-concrete gated timm models over their dense twins, on CPU.

Run from the repository root (4 to 6 minutes with the defaults on one thread, depending on how busy the
machine is)::

    python benchmarks/train_step.py
    python benchmarks/train_step.py --models resnet50 --batch 4 --rounds 40
    python benchmarks/train_step.py --threads 2 --optimizer adamw

For each model the script builds the dense timm model (``pretrained=False``), deep-copies it and gates the
copy with ``dynsparse.sparsify_`` (hard-concrete gates on ``neurons``/``heads``/``layers`` for ViTs,
``channels``/``layers`` for ResNets), so both start from the same weights. Both are in train mode (the gates
sample). One training step is: forward, cross-entropy loss (plus the gate penalty for the gated model),
backward, optimizer step, on one fixed random batch.

Method (the machine is small, shared and noisy): a few warm-up steps of each model, then rounds of one dense
and one gated step, alternating which runs first; the result is the median of the per-round ratios
gated/dense with their interquartile range, next to the median step times. Every step is timed twice: by
the wall clock, and by the CPU time of the process, which leaves out the time the process waited while
other processes ran (on one thread it is the step's own work; with more threads it also counts their
spinning). Progress goes to stderr; stdout ends with a markdown table for ``docs/benchmarks.md``.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from _timing import Spread, interleaved_rounds, markdown_table, paired_ratios, spread
from torch import nn

import dynsparse as ds

HC = {"gate": "hard_concrete"}
#: model name -> (sparsify spec, default batch size); image size is 224 for all.
MODELS: dict[str, tuple[dict[str, dict[str, str]], int]] = {
    "vit_small_patch16_224": ({"neurons": HC, "heads": HC, "layers": HC}, 8),
    "resnet50": ({"channels": HC, "layers": HC}, 8),
}
IMAGE_SIZE = 224
NUM_CLASSES = 1000
PENALTY_WEIGHT = 1e-4  # its value does not change the cost of a step


@dataclass(frozen=True)
class Result:
    model: str
    batch: int
    rounds: int
    gates: int
    dense_s: Spread  # wall-clock seconds per step
    gated_s: Spread
    ratio: Spread  # per-round gated/dense, wall clock
    cpu_ratio: Spread  # per-round gated/dense, process CPU time


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: str, gated: bool) -> Callable[[], None]:
    """One training step of ``model`` on the fixed batch ``(x, y)``; the gated model adds its gate penalty."""
    opt = make_optimizer(optimizer, model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if gated:
            loss = loss + PENALTY_WEIGHT * ds.penalty(model)
        loss.backward()
        opt.step()

    return step


def bench_model(name: str, batch: int, rounds: int, warmup: int, optimizer: str) -> Result:
    spec, _ = MODELS[name]
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).train()
    gated = ds.sparsify_(copy.deepcopy(dense), spec).train()
    gated_state = gated.state_dict()
    assert all(torch.equal(v, gated_state[k]) for k, v in dense.state_dict().items()), "weights differ"
    n_gates = sum(1 for _ in ds.named_gates(gated))

    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    steps = {
        "dense": make_step(dense, x, y, optimizer, gated=False),
        "gated": make_step(gated, x, y, optimizer, gated=True),
    }

    def progress(r: int, wall: dict[str, float], cpu: dict[str, float]) -> None:
        print(
            f"  round {r + 1:3d}/{rounds}: wall dense {wall['dense']:.3f} s gated {wall['gated']:.3f} s "
            f"ratio {wall['gated'] / wall['dense']:.3f} | cpu ratio {cpu['gated'] / cpu['dense']:.3f}",
            file=sys.stderr,
            flush=True,
        )

    print(f"{name}: batch {batch}, {n_gates} gates, {warmup} warm-up + {rounds} rounds", file=sys.stderr, flush=True)
    t = interleaved_rounds(steps, rounds=rounds, warmup=warmup, on_round=progress)
    return Result(
        name,
        batch,
        rounds,
        n_gates,
        dense_s=spread(t.wall["dense"]),
        gated_s=spread(t.wall["gated"]),
        ratio=spread(paired_ratios(t.wall["gated"], t.wall["dense"])),
        cpu_ratio=spread(paired_ratios(t.cpu["gated"], t.cpu["dense"])),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to run")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model, 8)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per model (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD+momentum or AdamW (default: sgd)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or (args.batch is not None and args.batch < 1):
        p.error("--rounds, --threads and --batch must be positive, --warmup non-negative")

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormals would slow whichever model happens to produce them
    setup = (
        f"torch {torch.__version__}, timm {timm.__version__}, dynsparse {ds.__version__}, "
        f"{os.cpu_count()} CPU(s), {torch.get_num_threads()} thread(s), "
        f"optimizer {args.optimizer}, image {IMAGE_SIZE}x{IMAGE_SIZE}, hard_concrete gates in train mode"
    )
    print(setup, flush=True)

    results = []
    for name in args.models:
        batch = args.batch or MODELS[name][1]
        r = bench_model(name, batch, args.rounds, args.warmup, args.optimizer)
        results.append(r)
        print(
            f"{r.model}: threads {torch.get_num_threads()}, batch {r.batch}, image {IMAGE_SIZE}, rounds {r.rounds}: "
            f"median step dense {r.dense_s.median:.3f} s, gated {r.gated_s.median:.3f} s; gated/dense "
            f"{r.ratio.median:.3f}x (IQR {r.ratio.q1:.3f}-{r.ratio.q3:.3f}), by CPU time {r.cpu_ratio.median:.3f}x "
            f"(IQR {r.cpu_ratio.q1:.3f}-{r.cpu_ratio.q3:.3f})",
            flush=True,
        )

    header = [
        "model",
        "gates",
        "threads",
        "batch",
        "image",
        "rounds",
        "dense step (s)",
        "gated step (s)",
        "gated/dense",
        "IQR",
        "gated/dense, CPU time",
        "IQR, CPU time",
    ]
    rows = [
        [
            f"`{r.model}`",
            r.gates,
            torch.get_num_threads(),
            r.batch,
            IMAGE_SIZE,
            r.rounds,
            f"{r.dense_s.median:.3f}",
            f"{r.gated_s.median:.3f}",
            f"{r.ratio.median:.3f}×",
            f"{r.ratio.q1:.3f}–{r.ratio.q3:.3f}",
            f"{r.cpu_ratio.median:.3f}×",
            f"{r.cpu_ratio.q1:.3f}–{r.cpu_ratio.q3:.3f}",
        ]
        for r in results
    ]
    print()
    print(markdown_table(header, rows, align="lrrrrrrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-input channel gating (FBS) of timm ResNets on CPU: measured speed-up over dense against the FLOPs-ideal one.

Run from the repository root (one thread; about 10 minutes with the defaults)::

    python benchmarks/dynamic_channels.py
    python benchmarks/dynamic_channels.py --models resnet18 --batches 32 --strategies loop group union grouped_conv
    python benchmarks/dynamic_channels.py --malloc keep --channels-last
    python benchmarks/dynamic_channels.py --malloc keep --channels-last --no-kernel   # + kernels on vs off

Cases: ``resnet18`` / ``resnet50`` (``pretrained=False``, seed 0, 224x224, fp32, eval mode), every block gated
with ``{"channels": {"gate": "fbs", "keep": 0.5}}`` (BasicBlock: ``conv1`` outputs; Bottleneck: ``conv1`` and
``conv2`` outputs). The gate weights are drawn at random (normal, std ``1/sqrt(C_in)``, bias 1) so that the
images of a batch make different decisions; the images are smooth random fields (7x7 noise upsampled, random
per-image brightness and contrast), so their pooled features differ as real images' do (white noise would pool
to the same vector for every image). The script prints how many distinct decisions a batch makes and how
much of the channels the union of the batch's kept channels covers.

Method: ``torch.inference_mode()``, warm-up rounds, then rounds that run dense and dynamic once each in an order
that rotates every round; the speed-up is the median of the per-round paired ratios (quartiles in brackets), by
wall clock and by process CPU time. The FLOPs-ideal speed-up is the ratio of ``torch.utils.flop_counter`` counts
of one forward pass of each model, the dynamic one counted as it ran (gate FLOPs included; for the ``masked``
strategy the ideal is that of the gathered run, to show what masking loses).

Run conditions, always the same for dense and dynamic: ``--channels-last`` moves both models and the images to
``torch.channels_last`` (oneDNN then runs the convs in NHWC without reordering activations around every conv; the
FBS runners keep the input's layout); ``--malloc keep`` makes glibc keep and reuse freed memory
(``_timing.keep_freed_memory``), as a caching allocator would.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (
    add_memory_options,
    apply_memory_options,
    count_flops,
    interleaved_rounds,
    markdown_table,
    paired_ratios,
    speed_cells,
    spread,
)

from dynsparse.commands.args import nonnegative_int, positive_int
from dynsparse.layers.channel_gating import STRATEGIES


def build(name: str, keep: float, strategy: str, memory_format: torch.memory_format = torch.contiguous_format):
    import timm

    import dynsparse as ds

    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False).eval()
    dyn = timm.create_model(name, pretrained=False).eval()
    dyn.load_state_dict(dense.state_dict())
    ds.sparsify_(dyn, {"channels": {"gate": "fbs", "keep": keep, "strategy": strategy}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in dyn.modules():
            if type(m).__name__ == "FBSGate":
                m.fc.weight.copy_(torch.randn(m.fc.weight.shape, generator=g) / math.sqrt(m.in_dim))
                m.fc.bias.fill_(1.0)
    return dense.to(memory_format=memory_format), dyn.eval().to(memory_format=memory_format)


def images(batch: int, size: int = 224) -> torch.Tensor:
    """Smooth random images with per-image brightness / contrast (their pooled features differ)."""
    g = torch.Generator().manual_seed(batch)
    low = torch.randn(batch, 3, 7, 7, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 1.5 + 0.25
    shift = torch.randn(batch, 3, 1, 1, generator=g) * 0.5
    return x * scale + shift


def without_kernels(model, x):
    """``model(x)`` with `dynsparse.kernels.load` answering None (the PyTorch gathers run), then restored."""
    from dynsparse import kernels

    real = kernels.load
    kernels.load = lambda: None
    try:
        return model(x)
    finally:
        kernels.load = real


def decision_stats(dyn, x) -> tuple[float, float]:
    """Mean over gates of (distinct decisions in the batch, fraction of channels in the union of kept ones)."""
    from dynsparse.layers.channel_gating import FBSBlockMixin

    distinct, union = [], []

    def record(block, args):
        for _, gate in block.gates():
            if gate is not None:
                idx, _ = gate.decide(args[0].mean((2, 3)))
                distinct.append(torch.unique(idx, dim=0).shape[0])
                union.append(torch.unique(idx).numel() / gate.num_units)

    hooks = [m.register_forward_pre_hook(record) for m in dyn.modules() if isinstance(m, FBSBlockMixin)]
    try:
        dyn(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(distinct) / len(distinct), sum(union) / len(union)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 32])
    p.add_argument("--strategies", nargs="+", default=["auto"], choices=STRATEGIES)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument(
        "--rounds", type=nonnegative_int, default=0, help="timed rounds (default: 20 at batch 1, 5 at batch 32)"
    )
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument(
        "--no-kernel",
        action="store_true",
        help="also time the dynamic model with the compiled kernels switched off (a third interleaved variant) and "
        "print the kernels' speed-up",
    )
    add_memory_options(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    memory_format = apply_memory_options(args)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"224x224 fp32, inference_mode, keep {args.keep}, malloc {args.malloc}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}"
    )
    header = ["model", "batch", "strategy", "distinct / union", "dense ms", "dynamic ms", "speed-up, wall (IQR)"]
    header += ["speed-up, CPU", "FLOPs-ideal", "achieved / ideal", "rounds"]
    rows = []
    t_start = time.perf_counter()
    for name in args.models:
        for strategy in args.strategies:
            dense, dyn = build(name, args.keep, strategy, memory_format)
            for b in args.batches:
                x = images(b).contiguous(memory_format=memory_format)
                with torch.inference_mode():
                    distinct, union = decision_stats(dyn, x)
                    ideal_model = dyn
                    if strategy == "masked":
                        ideal_model = build(name, args.keep, "auto", memory_format)[1]
                    ideal = count_flops(dense, x) / count_flops(ideal_model, x)
                    rounds = args.rounds or (20 if b == 1 else 5)
                    steps = {"dense": lambda m=dense, x=x: m(x), "dyn": lambda m=dyn, x=x: m(x)}
                    if args.no_kernel:
                        steps["no kernel"] = lambda m=dyn, x=x: without_kernels(m, x)
                    t = interleaved_rounds(steps, rounds, args.warmup)
                    if args.no_kernel:
                        r = spread(paired_ratios(t.wall["no kernel"], t.wall["dyn"]))
                        print(f"{name} b{b}: kernels on vs off {r.median:.3f}x ({r.q1:.3f}-{r.q3:.3f})", flush=True)
                rows.append([name, b, strategy, f"{distinct:.1f} / {union:.0%}", *speed_cells(t, ideal), rounds])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(markdown_table(header, rows, "lrlrrrrrrrr"))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

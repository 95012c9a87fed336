"""Where the time of the ``resnet`` case of ``convert_speed.py`` goes: per-layer times of the dense ResNet-50
and of its converted copy (50 % of the internal channels removed), against each layer's FLOPs.

Run from the repository root (about 1 minute at batch 1, 4 at batch 32, on one thread)::

    python benchmarks/convert_layers.py --batch 32
    python benchmarks/convert_layers.py --batch 32 --malloc keep --channels-last

The models are exactly those of ``convert_speed.py --cases resnet`` (same seed, masks and ``convert`` call), with
the same ``--channels-last`` and ``--malloc`` options. Every leaf module that computes (conv, BN, ReLU, max-pool,
global pool, classifier) is timed by forward hooks with the CPU time of the calling thread
(``time.thread_time``: one intra-op thread does all the work, and time lost to other processes is left out);
``rest`` is the forward's time minus its modules' (residual additions, Python). The two models run one forward
each per round, the order alternating; every figure is the median over rounds. Modules are grouped by role:
the stem conv, the ``conv1`` / ``conv2`` / ``conv3`` / downsample convs of each stage, and BN / ReLU at the
internal width (``bn1``, ``bn2``, ``act1``, ``act2``, which the pruning halves) or at the full width (the rest).
Hooks add a little time per module to both models alike; compare ratios, not absolute times with
``convert_speed.py``.

Columns: ms dense / converted, speed-up, FLOPs ratio of the group (FLOPs counted from the actual shapes: 2 per
multiply-add of convs and the classifier; norms, activations and pooling have none), efficiency = speed-up /
FLOPs ratio, and the share of the converted model's time. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import timm
import torch
from _timing import add_memory_options, apply_memory_options, markdown_table
from convert_speed import IMAGE_SIZE, VERIFY_BATCH, build_dynsparse
from torch import nn

from dynsparse.commands.args import nonnegative_int, positive_int

TIMED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear, timm.layers.SelectAdaptivePool2d)
INTERNAL = ("bn1", "bn2", "act1", "act2")


def group_of(fqn: str, module: nn.Module) -> str:
    parts = fqn.split(".")
    stage = parts[0] if parts[0].startswith("layer") else ""
    if isinstance(module, nn.Conv2d):
        if not stage:
            return "stem conv"
        return f"{stage} {'downsample' if 'downsample' in parts else parts[-1]}"
    kind = type(module).__name__
    if isinstance(module, (nn.BatchNorm2d, nn.ReLU)):
        return f"{kind} {'internal' if stage and parts[-1] in INTERNAL else 'full width'}"
    return kind


def flops_of(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return 2 * out.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return 2 * out.numel() * module.in_features
    return 0


def instrument(model: nn.Module, times: dict[str, list[float]], flops: dict[str, int]) -> None:
    """Forward hooks that append each timed module's thread CPU time per forward to ``times[fqn]``."""
    for fqn, m in model.named_modules():
        if not isinstance(m, TIMED):
            continue

        def pre(mod, args, fqn=fqn):
            mod._t0 = time.thread_time()

        def post(mod, args, out, fqn=fqn):
            times[fqn].append(time.thread_time() - mod._t0)
            flops[fqn] = flops_of(mod, out)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default: 32)")
    p.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (default: 7)")
    p.add_argument(
        "--warmup", type=nonnegative_int, default=2, help="untimed forwards of each model first (default: 2)"
    )
    add_memory_options(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    fmt = apply_memory_options(args)

    torch.manual_seed(0)
    dense = timm.create_model("resnet50", pretrained=False).eval().to(memory_format=fmt)
    torch.manual_seed(2)
    torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)  # the draws of convert_speed.py: same verification batch
    x_verify = torch.randn(VERIFY_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    converted = build_dynsparse("resnet", dense, x_verify).model.to(memory_format=fmt)
    models = {"dense": dense, "converted": converted}
    times = {k: defaultdict(list) for k in models}
    flops = {k: {} for k in models}
    total = {k: [] for k in models}
    for k, m in models.items():
        instrument(m, times[k], flops[k])
    torch.manual_seed(1)
    x = torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=fmt)
    names = list(models)
    with torch.inference_mode():
        for _ in range(args.warmup):
            for k in names:
                models[k](x)
        for k in names:
            times[k].clear()
        for r in range(args.rounds):
            for k in names if r % 2 == 0 else names[::-1]:
                t0 = time.thread_time()
                models[k](x)
                total[k].append(time.thread_time() - t0)
            print(
                f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {total[k][-1]:.3f} s" for k in names),
                file=sys.stderr,
                flush=True,
            )

    med = {k: {f: statistics.median(v) for f, v in times[k].items()} for k in names}
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # dense s, conv s, dense F, conv F
    for k, col in (("dense", 0), ("converted", 1)):
        mods = dict(models[k].named_modules())
        for f, t in med[k].items():
            g = groups[group_of(f, mods[f])]
            g[col] += t
            g[col + 2] += flops[k][f]
    fwd = {k: statistics.median(total[k]) for k in names}
    rest = [fwd[k] - sum(med[k].values()) for k in names]
    groups["rest (additions, Python)"] = [*rest, 0, 0]
    conv_total = fwd["converted"]
    rows = []
    for name, (td, tc, fd, fc) in [*sorted(groups.items()), ("forward", [fwd["dense"], fwd["converted"], 0, 0])]:
        if name == "forward":
            fd, fc = (sum(g[2] for g in groups.values()), sum(g[3] for g in groups.values()))
        speed = td / tc if tc > 0 else float("nan")
        ratio = fd / fc if fc else None
        rows.append(
            [
                name,
                f"{1e3 * td:.1f}",
                f"{1e3 * tc:.1f}",
                f"{speed:.2f}×",
                f"{ratio:.2f}×" if ratio else "–",
                f"{speed / ratio:.2f}" if ratio else "–",
                f"{100 * tc / conv_total:.0f} %",
            ]
        )
    print(
        f"batch {args.batch}, 1 thread, {args.rounds} rounds (median), memory format "
        f"{'channels_last' if args.channels_last else 'NCHW'}, malloc {args.malloc}; thread CPU time"
    )
    print()
    header = ["group", "ms dense", "ms converted", "speed-up", "FLOPs ratio", "efficiency", "share of converted"]
    print(markdown_table(header, rows, align="lrrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

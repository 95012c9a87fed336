"""The compiled conv-weight gather (`dynsparse.kernels.conv_gather`) against the PyTorch passes it replaces.

Run from the repository root (one thread, about a minute)::

    python benchmarks/conv_gather.py
    python benchmarks/conv_gather.py --formats channels_last --rounds 50

Cases: the gathers FBS makes in a ResNet block at keep 0.5, for 3x3 weights of 64-512 channels and 1x1 weights
of resnet50's shapes, in both memory formats: ``cols`` (a consumer conv's kept input channels: BasicBlock
``conv2``), ``rows+scale`` (a producer's kept filters times their BatchNorm scale: ``conv1``) and
``rows+cols+scale`` (both: Bottleneck ``conv2``). Kept channels are a random half, sorted, as the gates give
them. PyTorch's path is what `dynsparse.layers.channel_kernels` runs without the kernel: ``index_select`` of
rows, of columns (on the flat view of a channels-last weight), then the multiply. Method: warm-up, then
interleaved rounds (order rotating), the median of the per-round ratios. Both results are checked equal first.
The weights stay in the cache between calls here (a whole model's do not), so this measures the copy itself.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from dynsparse.commands.args import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_rounds, markdown_table, paired_ratios, spread

SHAPES = [(64, 64, 3), (128, 128, 3), (256, 256, 3), (512, 512, 3), (512, 2048, 1), (2048, 512, 1)]


def cases(fmt: torch.memory_format):
    g = torch.Generator().manual_seed(0)
    for o, i, k in SHAPES:
        w = torch.randn(o, i, k, k, generator=g).contiguous(memory_format=fmt)
        rows = torch.randperm(o, generator=g)[: o // 2].sort().values
        cols = torch.randperm(i, generator=g)[: i // 2].sort().values
        scale = torch.randn(o, generator=g)
        yield f"{o}x{i}x{k}x{k}", "cols", w, None, cols, None
        yield f"{o}x{i}x{k}x{k}", "rows+scale", w, rows, None, scale
        yield f"{o}x{i}x{k}x{k}", "rows+cols+scale", w, rows, cols, scale


def main() -> None:
    from dynsparse import kernels
    from dynsparse.layers.channel_kernels import _take

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    formats = ["channels_last", "contiguous"]  # any other name ran the contiguous weights under that name
    p.add_argument("--formats", nargs="+", default=formats, choices=formats)
    weights = [f"{o}x{i}x{k}x{k}" for o, i, k in SHAPES]
    p.add_argument("--weights", nargs="+", default=None, choices=weights, help="only these, e.g. 64x64x3x3")
    p.add_argument("--rounds", type=positive_int, default=30)
    p.add_argument("--reps", type=positive_int, default=10, help="calls per timed step")
    args = p.parse_args()
    torch.set_num_threads(1)
    if kernels.load() is None:
        sys.exit(f"kernels unavailable: {kernels.why_unavailable()}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, {args.rounds} rounds")

    def torch_path(w, rows, cols, scale):
        out = w if rows is None else _take(w, 0, rows)
        out = out if cols is None else _take(out, 1, cols)
        return out if scale is None else out * scale.index_select(0, rows)[:, None, None, None]

    rows_out = []
    for fmt_name in args.formats:
        fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
        for shape, kind, w, rows, cols, scale in cases(fmt):
            if args.weights and shape not in args.weights:
                continue
            with torch.inference_mode():
                ref = torch_path(w, rows, cols, scale)
                got = kernels.conv_gather(w, rows, cols, scale)
                if not torch.equal(ref, got):
                    sys.exit(f"mismatch: {fmt_name} {shape} {kind}")

                def step(f, operands=(w, rows, cols, scale), reps=args.reps):
                    for _ in range(reps):
                        f(*operands)

                t = interleaved_rounds(
                    {"torch": lambda: step(torch_path), "kernel": lambda: step(kernels.conv_gather)}, args.rounds
                )
            r = spread(paired_ratios(t.wall["torch"], t.wall["kernel"]))
            ms = {v: 1e3 * spread(t.wall[v]).median / args.reps for v in ("torch", "kernel")}
            rows_out.append([fmt_name, shape, kind, f"{ms['torch']:.3f}", f"{ms['kernel']:.3f}",
                             f"{r.median:.2f}x ({r.q1:.2f}-{r.q3:.2f})"])  # fmt: skip
            print(" | ".join(rows_out[-1]), flush=True)
    print()
    header = ["format", "weight", "gather", "PyTorch ms", "kernel ms", "speed-up (IQR)"]
    print(markdown_table(header, rows_out, "lllrrr"))


if __name__ == "__main__":
    main()

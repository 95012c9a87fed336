"""Inference speed of ``dynsparse.convert`` output over the dense model on CPU, against the FLOPs-ideal speed-up,
next to the same models pruned with Torch-Pruning.

Run from the repository root (about 8 minutes with the defaults, on one thread)::

    pip install torch-pruning          # optional: without it the Torch-Pruning rows say "not installed"
    python benchmarks/convert_speed.py
    python benchmarks/convert_speed.py --cases vit --batch 1 --rounds 15
    python benchmarks/convert_speed.py --threads 2 --variants dynsparse
    python benchmarks/convert_speed.py --cases resnet --malloc keep --channels-last
    python benchmarks/convert_speed.py --cases resnet --malloc keep --optimize jit

Cases (timm models, ``pretrained=False``, seed 0, image 224x224, fp32, eval mode):

* ``vit``: ``vit_small_patch16_224`` with 50 % of the heads (3 of 6) and 50 % of the MLP neurons (768 of 1536)
  removed in every block; the residual width (384) stays.
* ``resnet``: ``resnet50`` with 50 % of the internal channels of every bottleneck removed (the outputs of
  ``conv1`` and ``conv2``, gates ``layerX.Y.act1`` / ``act2``); the residual widths stay.
* ``deit``: ``deit_tiny_patch16_224`` with both residual branches (attention and MLP) of blocks 2, 5, 8 and 11
  removed (4 of 12 blocks, evenly spaced).

Which units are kept (a fixed rule; for speed only the shapes matter): in every gate exactly half of the units,
those whose producer weights have the largest L1 norm: a head's ``q``, ``k`` and ``v`` rows of ``qkv``, a
neuron's row of ``fc1``, a channel's filter of ``conv1`` / ``conv2``. The dynsparse variant is built with
``sparsify_`` (fixed gates), ``fix_gates_`` (those masks) and ``convert`` (checked against the gated model on a
batch of 2); the converted model holds only timm / torch classes. Both kinds of variant are built by
``_convert_variants.py`` next to this script.

Torch-Pruning variants (``MetaPruner``, ``MagnitudeImportance(p=1)``, ``pruning_ratio=0.5``, classifier ignored):

* ``torch-pruning``: the same FLOPs as dynsparse. The layers that write the residual stream are ignored
  (ViT: ``patch_embed.proj``, every ``attn.proj`` and ``mlp.fc2``; ResNet: the stem conv, every ``conv3`` and
  downsample conv), so only the internal widths are pruned, to the same shapes as the dynsparse variant. ViT
  heads: ``num_heads={qkv: 6}``, ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=0.5``.
* ``torch-pruning (default)``: the same call without those ignored layers, so the residual widths are pruned
  too: far fewer FLOPs, the configuration of Torch-Pruning's own examples.

After Torch-Pruning, every timm ``Attention`` still holds its old ``num_heads``, ``head_dim`` and ``attn_dim``;
the script first runs the model as it is (and records whether it runs), then writes the three attributes back
by hand, as Torch-Pruning's ViT example does, and times that. A DeiT with whole blocks removed has no
Torch-Pruning counterpart here (its rows say n/a).

Method (the machine is small, shared and noisy): ``torch.inference_mode()``, a fixed random batch per batch
size, warm-up forwards of every variant, then rounds of one forward of each variant with the order rotating
every round (``_timing.interleaved_rounds``). The speed-up of a variant is the median over rounds of the paired
ratio dense/variant, with its interquartile range, by wall clock (and, as a check, by process CPU time). The
FLOPs-ideal speed-up is FLOPs(dense)/FLOPs(variant), both counted with ``torch.utils.flop_counter`` on the
actual models (batch 1; FLOPs are linear in the batch), CPU fused attention included (``_timing.count_flops``);
achieved/ideal = measured/ideal. The output ends with a markdown table for ``docs/benchmarks_convert.md``.

Run conditions, always the same for the dense model and every variant:

* ``--channels-last``: the dense model is moved to ``torch.channels_last`` before the variants are built from it
  (``convert`` keeps the memory format of the weights it slices), every variant is moved to it as well (a no-op
  for the converted model) and the inputs are channels-last. oneDNN then runs the convs in NHWC without reordering
  activations to its blocked layout and back around every conv. Default: the default (NCHW) layout.
* ``--malloc keep``: glibc keeps freed memory in the process and reuses it (``_timing.keep_freed_memory``),
  instead of unmapping every large block on ``free`` and page-faulting fresh zeroed pages for it in the next
  forward, as a caching allocator (jemalloc, tcmalloc) would. Default ``glibc``: glibc's defaults.
* ``--optimize fuse``: every model with BatchNorm (dense and variants) has each conv + BN pair folded into one
  conv by ``torch.fx.experimental.optimization.fuse`` (PyTorch's eager inference fusion) and is otherwise run
  eagerly; models without BatchNorm (the ViTs) are unchanged.
* ``--optimize jit``: every model (dense and variants) is timed as PyTorch's inference graph of it:
  ``torch.jit.trace`` on the timed batch, ``torch.jit.freeze``, ``torch.jit.optimize_for_inference`` (BN folded
  into the convs, conv weights pre-packed once in oneDNN's blocked layout instead of reordered at every call,
  conv + ReLU fused); its output is checked against the eager model's. FLOPs are counted on the eager models.
  Default ``none``: eager PyTorch.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from _convert_variants import (  # noqa: F401 (re-exported: DEIT_CLOSED_BLOCKS, FIXED, KEEP_RATIO, half_masks, short_error)
    DEIT_CLOSED_BLOCKS,
    FIXED,
    KEEP_RATIO,
    TP_DEFAULT,
    TP_SAME,
    Variant,
    build_dynsparse,
    build_torch_pruning,
    half_masks,
    log,
    short_error,
    tp,
)
from _timing import (
    Spread,
    add_memory_options,
    apply_memory_options,
    count_flops,
    interleaved_rounds,
    markdown_table,
    paired_ratios,
    spread,
)
from torch import Tensor, nn

import dynsparse as ds

IMAGE_SIZE = 224
VERIFY_BATCH = 2
VARIANTS = ("dynsparse", "tp", "tp-default")  # --variants choices
VARIANT_NAMES = {"dynsparse": "dynsparse", "tp": TP_SAME, "tp-default": TP_DEFAULT}


@dataclass(frozen=True)
class Case:
    model: str
    description: str
    target: float  # achieved/ideal the dynsparse variant should reach


CASES: dict[str, Case] = {
    "vit": Case("vit_small_patch16_224", "50 % heads + 50 % MLP neurons removed", 0.95),
    "resnet": Case("resnet50", "50 % internal channels removed", 0.90),
    "deit": Case("deit_tiny_patch16_224", "branches of blocks 2, 5, 8, 11 removed", 0.95),
}


@dataclass(frozen=True)
class Row:
    case: str
    batch: int
    rounds: int
    variant: str
    dense_flops: int
    flops: int | None
    runs: str
    dense_s: Spread | None = None
    variant_s: Spread | None = None
    speedup: Spread | None = None  # per-round dense/variant, wall clock
    cpu_speedup: Spread | None = None  # per-round dense/variant, process CPU time
    target: float | None = None

    @property
    def ideal(self) -> float | None:
        return self.dense_flops / self.flops if self.flops else None

    @property
    def achieved(self) -> float | None:
        return self.speedup.median / self.ideal if self.speedup is not None and self.ideal else None


# ---------------------------------------------------------------------------------------------------- timing


def jit_inference_graph(model: nn.Module, x: Tensor) -> Callable[[Tensor], Tensor]:
    """``model`` as PyTorch's frozen, inference-optimized TorchScript graph, traced on ``x``; checked against it."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile; it still works
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), x)))
        ref, out = model(x), graph(x)
        graph(x)  # the first calls run the graph optimizer's profiling passes
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    return graph


def fused_conv_bn(model: nn.Module, x: Tensor) -> nn.Module:
    """``model`` with every conv + BatchNorm pair folded into one conv (``torch.fx``'s inference fusion), eager
    otherwise; a model without BatchNorm (or that ``torch.fx`` cannot trace) is returned as is. Checked against it."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model.eval())
    except Exception as e:  # any tracing failure: time the model unfused, say so
        log(f"  torch.fx could not trace {type(model).__name__} ({type(e).__name__}); timed unfused")
        return model
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-3, atol=1e-3)
    return fused


def time_variants(
    case: str,
    dense: nn.Module,
    variants: list[Variant],
    batch: int,
    rounds: int,
    warmup: int,
    memory_format: torch.memory_format = torch.contiguous_format,
    optimize: str = "none",
) -> dict[str, tuple[Spread, Spread, Spread, Spread]]:
    """Interleaved forwards of ``dense`` and every runnable variant; per variant (dense s, variant s, speed-up, CPU)."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE).contiguous(memory_format=memory_format)
    models = {"dense": dense} | {v.name: v.model for v in variants if v.model is not None}
    if optimize == "jit":
        log(f"{case}: batch {batch}, building the frozen TorchScript inference graph of every model")
        models = {name: jit_inference_graph(m, x) for name, m in models.items()}
    elif optimize == "fuse":
        models = {name: fused_conv_bn(m, x) for name, m in models.items()}
    steps: dict[str, Callable[[], object]] = {name: (lambda m=m: m(x)) for name, m in models.items()}

    def progress(r: int, wall: dict[str, float], cpu: dict[str, float]) -> None:
        parts = [f"dense {wall['dense']:.3f} s"] + [
            f"{n} {wall[n]:.3f} s (x{wall['dense'] / wall[n]:.2f})" for n in models if n != "dense"
        ]
        log(f"  round {r + 1:3d}/{rounds}: " + ", ".join(parts))

    log(f"{case}: batch {batch}, {len(models)} models, {warmup} warm-up + {rounds} rounds")
    with torch.inference_mode():
        t = interleaved_rounds(steps, rounds=rounds, warmup=warmup, on_round=progress)
    out = {}
    for name in models:
        if name == "dense":
            continue
        out[name] = (
            spread(t.wall["dense"]),
            spread(t.wall[name]),
            spread(paired_ratios(t.wall["dense"], t.wall[name])),
            spread(paired_ratios(t.cpu["dense"], t.cpu[name])),
        )
    return out


def _off_format(model: nn.Module, memory_format: torch.memory_format) -> int:
    """How many 4-D parameters of ``model`` are not dense in ``memory_format``."""
    return sum(1 for p in model.parameters() if p.ndim == 4 and not p.is_contiguous(memory_format=memory_format))


def bench_case(
    case: str,
    batches: list[int],
    rounds: dict[int, int],
    warmup: int,
    wanted: list[str],
    memory_format: torch.memory_format = torch.contiguous_format,
    optimize: str = "none",
) -> list[Row]:
    spec = CASES[case]
    torch.manual_seed(0)
    dense = timm.create_model(spec.model, pretrained=False).eval().to(memory_format=memory_format)
    torch.manual_seed(2)
    x1, x_verify = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randn(VERIFY_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    log(f"{case}: building variants of {spec.model} ({spec.description})")
    variants: list[Variant] = []
    for key in wanted:
        name = VARIANT_NAMES[key]
        if key == "dynsparse":
            variants.append(build_dynsparse(case, dense, x_verify))
        elif case == "deit":
            if not any(v.name.startswith(TP_SAME) for v in variants):  # one n/a row
                variants.append(Variant(TP_SAME, None, runs="n/a (no Torch-Pruning counterpart of removing blocks)"))
        else:
            variants.append(build_torch_pruning(case, dense, name, x1))
    dense_flops = count_flops(dense, x1)
    for v in variants:
        if v.model is not None and memory_format != torch.contiguous_format:
            off = _off_format(v.model, memory_format)
            v.model = v.model.to(memory_format=memory_format)  # the same layout for every model
            v.notes.append(f"{off} 4-D weights were not {memory_format} as built; all are now")
        if v.model is not None:
            v.flops = count_flops(v.model, x1)
        flops = "FLOPs not counted"
        if v.flops:
            flops = f"GFLOPs {v.flops / 1e9:.3f} of {dense_flops / 1e9:.3f} (ideal {dense_flops / v.flops:.3f}x)"
        log(f"  {v.name}: runs? {v.runs}; {flops}")
        for note in v.notes:
            log(f"    {note}")
    rows = []
    for batch in batches:
        runnable = any(v.model is not None for v in variants)
        timed = (
            time_variants(case, dense, variants, batch, rounds[batch], warmup, memory_format, optimize)
            if runnable
            else {}
        )
        for v in variants:
            target = spec.target if v.name == "dynsparse" else None
            if v.name in timed:
                d, s, r, c = timed[v.name]
                rows.append(Row(case, batch, rounds[batch], v.name, dense_flops, v.flops, v.runs, d, s, r, c, target))
            else:
                rows.append(Row(case, batch, rounds[batch], v.name, dense_flops, v.flops, v.runs, target=target))
    return rows


# ------------------------------------------------------------------------------------------------------ report


def table(rows: list[Row]) -> str:
    header = [
        "case",
        "batch",
        "variant",
        "GFLOPs (dense → variant)",
        "FLOPs ideal",
        "measured speed-up (median, IQR)",
        "achieved/ideal",
        "target",
        "speed-up by CPU time",
        "ms dense / variant",
        "runs?",
    ]
    body = []
    for r in rows:
        gflops = f"{r.dense_flops / 1e9:.2f} → {r.flops / 1e9:.2f}" if r.flops else "n/a"
        ideal = f"{r.ideal:.2f}×" if r.ideal else "n/a"
        if r.speedup is not None and r.cpu_speedup is not None and r.dense_s is not None and r.variant_s is not None:
            sp = f"{r.speedup.median:.2f}× ({r.speedup.q1:.2f}–{r.speedup.q3:.2f})"
            ach = f"{r.achieved:.2f}"
            cpu = f"{r.cpu_speedup.median:.2f}×"
            ms = f"{1e3 * r.dense_s.median:.0f} / {1e3 * r.variant_s.median:.0f}"
        else:
            sp = ach = cpu = ms = "n/a"
        if r.target is None:
            target = ""
        elif r.achieved is None:
            target = f"≥ {r.target:.2f}"
        else:
            target = f"≥ {r.target:.2f} {'met' if r.achieved >= r.target else 'missed'}"
        body.append([r.case, r.batch, r.variant, gflops, ideal, sp, ach, target, cpu, ms, r.runs])
    return markdown_table(header, body, align="llllrrrlrrl")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="cases to run (default: all)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument(
        "--rounds",
        nargs="+",
        type=int,
        default=None,
        help="timed rounds: one value for every batch size or one per --batch (default: 31 for batch <= 4, else 11)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards of each variant first (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants besides dense (default: all)"
    )
    add_memory_options(p)
    p.add_argument(
        "--optimize",
        choices=("none", "jit", "fuse"),
        default="none",
        help="none: eager models; jit: every model as its frozen TorchScript inference graph; fuse: eager with "
        "conv + BN folded by torch.fx (default: none)",
    )
    args = p.parse_args(argv)
    if args.rounds is None:
        rounds = {b: 31 if b <= 4 else 11 for b in args.batch}
    elif len(args.rounds) == 1:
        rounds = dict.fromkeys(args.batch, args.rounds[0])
    elif len(args.rounds) == len(args.batch):
        rounds = dict(zip(args.batch, args.rounds, strict=True))
    else:
        p.error("--rounds takes one value or one per --batch value")
    if min(args.batch) < 1 or min(rounds.values()) < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--batch, --rounds and --threads must be positive, --warmup non-negative")

    torch.set_num_threads(args.threads)
    memory_format = apply_memory_options(args)  # before any model is built: the same allocator for every model
    layout = "channels_last" if args.channels_last else "NCHW (default layout)"
    torch.set_flush_denormal(True)  # denormals would slow whichever model happens to produce them
    tp_version = importlib.metadata.version("torch-pruning") if tp is not None else "not installed"
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, dynsparse {ds.__version__}, torch-pruning {tp_version}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s); "
        f"{torch.get_num_threads()} intra-op thread(s), {torch.get_num_interop_threads()} inter-op; "
        f"batch {' '.join(map(str, args.batch))}; rounds {' '.join(f'{rounds[b]} (batch {b})' for b in args.batch)}; "
        f"warm-up {args.warmup}; image {IMAGE_SIZE}x{IMAGE_SIZE}, fp32, inference_mode; "
        f"memory format {layout}; malloc {args.malloc}; optimize {args.optimize}",
        flush=True,
    )
    rows: list[Row] = []
    for case in args.cases:
        case_rows = bench_case(case, args.batch, rounds, args.warmup, args.variants, memory_format, args.optimize)
        rows += case_rows
        for r in case_rows:
            if r.speedup is not None:
                print(
                    f"{r.case} batch {r.batch} {r.variant}: {r.speedup.median:.3f}x "
                    f"(IQR {r.speedup.q1:.3f}-{r.speedup.q3:.3f}) vs ideal {r.ideal:.3f}x -> "
                    f"{r.achieved:.3f} of ideal; CPU time {r.cpu_speedup.median:.3f}x; runs? {r.runs}",
                    flush=True,
                )
            else:
                print(f"{r.case} batch {r.batch} {r.variant}: not timed; runs? {r.runs}", flush=True)
    print()
    print(
        f"threads: {torch.get_num_threads()}; rounds: {', '.join(f'{rounds[b]} at batch {b}' for b in args.batch)}; "
        f"memory format: {layout}; malloc: {args.malloc}; optimize: {args.optimize}"
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

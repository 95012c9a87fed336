"""Per-input MLP neuron selection (CATS, Deja Vu) on CPU: measured speed-up against the FLOPs-ideal one, and accuracy.

Run from the repository root, one thread::

    python benchmarks/dynamic_neurons.py --part decode     # (a) single tokens through LLM-sized MLPs, ~3 min
    python benchmarks/dynamic_neurons.py --part vit        # (b) vit_small_patch16_224, dejavu per image, ~4 min
    python benchmarks/dynamic_neurons.py --part accuracy   # CATS / Deja Vu on a small ViT trained on Fashion-MNIST

Speed (random weights, fp32, ``torch.inference_mode()``, seed 0):

* ``decode``: one MLP, ``x`` of shape (B, 1, C) (B single tokens, each with its own decisions), keep 0.5:
  ``swiglu`` (C = 1024, hidden 2816, SiLU) and ``mlp`` (C = 1024 → 4096 → 1024, GELU); gates ``cats``
  (calibrated on 64 random tokens) and ``dejavu`` per token (an untrained predictor of the default rank C/8:
  random but input-dependent decisions; the cost is the same as a trained one). Each step runs the MLP 20 times.
* ``vit``: ``vit_small_patch16_224`` with ``dejavu`` per image (``per="input"``) at keep 0.5 in all 12 MLPs.

Method: dense and dynamic run interleaved after warm-up; the speed-up is the median of the per-round paired
ratios (quartiles in brackets), by wall clock and by process CPU time. The FLOPs-ideal speed-up counts both
with ``torch.utils.flop_counter``, the dynamic one on the FLOP-minimal ``gather`` path (gathered matmuls only,
predictor or threshold included), whatever kernels the timed ``strategy`` uses.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dynsparse.commands.args import nonnegative_int, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import count_flops, interleaved_rounds, markdown_table, speed_cells

HEADER = [
    "case",
    "batch",
    "strategy",
    "dense ms",
    "dynamic ms",
    "speed-up, wall (IQR)",
    "CPU time",
    "FLOPs-ideal",
    "achieved / ideal",
    "rounds",
]


def _measure(name, dense, dyn, x, strategy, rounds, warmup, reps=1):
    from dynsparse.layers.neuron_gating import set_strategy_

    with torch.inference_mode():
        set_strategy_(dyn, "gather")
        ideal = count_flops(dense, x) / count_flops(dyn, x)
        set_strategy_(dyn, strategy)

        def run(m):
            for _ in range(reps):
                m(x)

        t = interleaved_rounds({"dense": lambda: run(dense), "dyn": lambda: run(dyn)}, rounds, warmup)
    row = [name, x.shape[0], strategy, *speed_cells(t, ideal, reps=reps, digits=3), rounds]
    print(" | ".join(str(c) for c in row), flush=True)
    return row


def decode(args) -> list:
    from timm.layers import Mlp, SwiGLU

    from dynsparse.layers.neuron_gating import calibrate_neurons_, gate_neurons_

    hosts = {"swiglu": lambda: SwiGLU(1024, 2816), "mlp": lambda: Mlp(1024, 4096)}
    rows = []
    for host in args.hosts:
        torch.manual_seed(0)
        dense = nn.Sequential(hosts[host]()).eval()
        for gate in args.gates:
            dyn = gate_neurons_(copy.deepcopy(dense), gate, keep=args.keep, per="token")
            if gate == "cats":
                calibrate_neurons_(dyn, [torch.randn(64, 1, 1024)])
            for b in args.batches:
                x = torch.randn(b, 1, 1024, generator=torch.Generator().manual_seed(b))
                for strategy in ["auto", *args.strategies]:
                    rows.append(_measure(f"{host}/{gate}", dense, dyn, x, strategy, args.rounds or 30, 3, 20))
    return rows


def vit(args) -> list:
    import timm

    import dynsparse as ds

    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    dyn = ds.sparsify_(copy.deepcopy(dense), {"neurons": {"gate": "dejavu", "keep": args.keep, "per": "input"}})
    rows = []
    for b in args.vit_batches:
        x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
        rows.append(_measure("vit_small/dejavu", dense, dyn, x, "auto", args.rounds or (20 if b == 1 else 6), 2))
    return rows


def accuracy(args) -> None:
    """CATS (calibrated, no fine-tuning) and Deja Vu (predictors trained, host frozen) vs keep, Fashion-MNIST ViT."""
    import timm
    from _common import accuracy as acc
    from _common import train_adam_cosine

    import dynsparse as ds
    from dynsparse.data import load_dataset, make_loader
    from dynsparse.layers.neuron_gating import calibrate_neurons_, set_strategy_, train_predictors_
    from dynsparse.recipes.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    train = load_dataset("fashion-mnist", split="train", channels=1)
    test_loader = make_loader(load_dataset("fashion-mnist", split="test", channels=1), 1000, shuffle=False)
    # the model of recipes/fashion_vit_hc40.yaml: 16 patch tokens of 7x7 pixels + a class token
    kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    if args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
        print(f"# dense ViT from {args.checkpoint}")
    else:
        loader = make_loader(torch.utils.data.Subset(train, range(20000)), 128, shuffle=True, seed=0, drop_last=True)
        train_adam_cosine(model, loader, args.epochs, lr=2e-3)
        print(f"# dense ViT trained {args.epochs} epochs on 20000 images in {time.perf_counter() - t0:.0f} s")
    model.eval()
    held = torch.utils.data.Subset(train, range(60000 - args.calib, 60000))  # images outside the training subset
    calib = [x for x, _ in make_loader(held, 500, shuffle=False)]
    dense_acc = acc(model, test_loader)
    cats = ds.sparsify_(copy.deepcopy(model), {"neurons": {"gate": "cats", "keep": 0.5}})
    calibrate_neurons_(cats, calib)
    dejavu = ds.sparsify_(copy.deepcopy(model), {"neurons": {"gate": "dejavu", "keep": 0.5, "per": "input"}})
    recall = train_predictors_(dejavu, calib)
    print(f"# dejavu held-out recall at keep 0.5 (chance 0.5): {', '.join(f'{v:.3f}' for v in recall.values())}")
    rows = []
    for keep in args.keeps:
        row = [keep, f"{dense_acc:.2%}"]
        for m in (cats, dejavu):
            set_strategy_(m, "mask")  # same outputs as the gathered path (tested), faster for accuracy runs
            with ds.budget(m, keep):
                row.append(f"{acc(m, test_loader):.2%}")
        rows.append(row)
    header = ["keep", "dense", "cats, per token (no FT)", "dejavu, per image (predictors only)"]
    print(markdown_table(header, rows, "rrrr"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["decode", "vit", "accuracy"], nargs="+", default=["decode", "vit"])
    p.add_argument("--hosts", nargs="+", default=["swiglu", "mlp"])
    p.add_argument("--gates", nargs="+", default=["cats", "dejavu"])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
    p.add_argument("--vit-batches", type=positive_int, nargs="+", default=[1, 32])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--strategies", nargs="+", default=[], help="also time these strategies (gather, union, mask)")
    p.add_argument("--rounds", type=nonnegative_int, default=0)
    p.add_argument("--epochs", type=nonnegative_int, default=5)
    p.add_argument(
        "--checkpoint",
        help="a trained dense model (recipe checkpoint), e.g. "
        "runs/fashion_vit_hc40/baseline/checkpoint.pt; default: train one for --epochs",
    )
    p.add_argument("--calib", type=positive_int, default=4000, help="calibration / predictor-training images")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, fp32")
    t0, rows = time.perf_counter(), []
    if "decode" in args.part:
        rows += decode(args)
    if "vit" in args.part:
        rows += vit(args)
    if rows:
        print("\n" + markdown_table(HEADER, rows, "lrlrrrrrrr") + f"\n\ntotal {time.perf_counter() - t0:.0f} s")
    if "accuracy" in args.part:
        accuracy(args)


if __name__ == "__main__":
    main()

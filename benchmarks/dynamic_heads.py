"""Per-input attention heads (Deja Vu's head predictor) on CPU: measured speed-up against the FLOPs-ideal one, and
accuracy against a static head cut of the same size.

Run from the repository root, one thread::

    python benchmarks/dynamic_heads.py --part speed      # vit_small_patch16_224, keep 0.5 in all 12 layers, ~1 min
    python benchmarks/dynamic_heads.py --part layers     # one attention layer of each size at batch 1, ~1 min
    python benchmarks/dynamic_heads.py --part accuracy --checkpoint runs/fashion_vit_hc40/baseline/checkpoint.pt
    python benchmarks/dynamic_heads.py --part accuracy --finetune 2   # + fine-tuning with the predicted heads

Speed: ``vit_small_patch16_224`` (``pretrained=False``, seed 0, 224x224, fp32, ``torch.inference_mode()``), every
attention layer given ``{"heads": {"gate": "dejavu", "keep": 0.5}}`` (3 of 6 heads per image). The predictors are
drawn at random (normal, std 1), so the images of a batch choose different head sets (the cost of a trained
predictor is the same); the script prints how many distinct sets a batch makes in the first layer. Dense and
dynamic run interleaved after warm-up; the speed-up is the median of the per-round paired ratios (quartiles in
brackets), by wall clock and by process CPU time. The FLOPs-ideal speed-up is the ratio of
``torch.utils.flop_counter`` counts of one forward pass of each (predictors included; dynsparse adds the fused
attention's formula, which the counter lacks).

Layers: one timm ``Attention`` (qkv bias) of each size at batch 1, keep 0.5, dense vs gathered (``auto``) vs masked
(``mask``: every head computed, the dropped ones zeroed), 20 calls per round, 15 interleaved rounds: where the
predictor and the gathers cost more than half the heads save.

Accuracy: the small ViT of ``recipes/fashion_vit_hc40.yaml`` (embed 96, depth 6, 4 heads, 16 patch tokens of 7x7)
trained densely, no fine-tuning. ``dejavu``: predictors trained by `train_head_predictors_` on 4,000 training
images outside the model's training subset (host frozen); ``static``: the same number of heads in every layer for
every image, the heads with the largest mean output norm on the same 4,000 images (what a one-shot static cut by
Deja Vu's own criterion keeps). Accuracy on the 10,000 test images at each ``keep``. With ``--finetune N``: the
host is then fine-tuned N epochs with the predicted heads (keep 0.5, Adam, cosine decay; the predictors stay fixed,
their choice is not differentiable) on the recipe's 20,000 training images, the predictors are refit to the
fine-tuned heads, and the knob is evaluated again; the static cut at keep 0.5 is fine-tuned the same way (its
dropped heads' ``proj`` columns held at zero) for comparison.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

from dynsparse.commands.args import nonnegative_int, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import count_flops, interleaved_rounds, markdown_table, speed_cells

HEADER = [
    "case",
    "batch",
    "distinct head sets (layer 0)",
    "dense ms",
    "dynamic ms",
    "speed-up, wall (IQR)",
    "CPU time",
    "FLOPs-ideal",
    "achieved / ideal",
    "rounds",
]


def speed(args) -> list:
    import timm

    import dynsparse as ds

    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    dyn = ds.sparsify_(copy.deepcopy(dense), {"heads": {"gate": "dejavu", "keep": args.keep}})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in dyn.named_parameters():
            if ".heads.predictor." in name:
                p.copy_(torch.randn(p.shape, generator=g))
    rows = []
    for b in args.batches:
        x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ideal = count_flops(dense, x) / count_flops(dyn, x)
            tokens = dyn.norm_pre(dyn._pos_embed(dyn.patch_embed(x)))
            sets = len(torch.unique(dyn.blocks[0].attn.heads(dyn.blocks[0].norm1(tokens)), dim=0))
            rounds = args.rounds or (20 if b == 1 else 5)
            t = interleaved_rounds({"dense": lambda x=x: dense(x), "dyn": lambda x=x: dyn(x)}, rounds, 2)
        row = [f"vit_small/heads keep {args.keep}", b, sets, *speed_cells(t, ideal), rounds]
        print(" | ".join(str(c) for c in row), flush=True)
        rows.append(row)
    return rows


LAYERS = [(96, 4, 50), (96, 4, 197), (192, 3, 197), (192, 6, 197), (384, 6, 50), (384, 6, 197), (768, 12, 197)]


def layers(args) -> list:
    """One timm ``Attention`` (qkv bias) per size, keep 0.5, batch 1: dense, gathered (``auto``) and masked."""
    from timm.layers import Attention

    from dynsparse.layers.head_gating import gate_heads_, set_head_strategy_

    rows = []
    for c, h, n in LAYERS:
        torch.manual_seed(0)
        host = torch.nn.Sequential(Attention(c, num_heads=h, qkv_bias=True)).eval()
        gathered = gate_heads_(copy.deepcopy(host), "dejavu", keep=args.keep)
        masked = set_head_strategy_(copy.deepcopy(gathered), "mask")
        x = torch.randn(1, n, c)
        with torch.inference_mode():
            ideal = count_flops(host, x) / count_flops(gathered, x)
            models = {"dense": host, "dyn": gathered, "mask": masked}
            t = interleaved_rounds({k: (lambda m=m, x=x: [m(x) for _ in range(20)]) for k, m in models.items()}, 15, 2)
        cells = speed_cells(t, ideal, reps=20, digits=3)
        mask = speed_cells(t, ideal, variant="mask", reps=20, digits=3)
        row = [f"C {c}, {h} heads, {n} tokens", *cells[:3], mask[2], cells[4], cells[5]]
        print(" | ".join(str(v) for v in row), flush=True)
        rows.append(row)
    return rows


def accuracy(args) -> None:
    import timm
    from _common import accuracy as acc
    from _common import train_adam_cosine

    import dynsparse as ds
    from dynsparse.data import load_dataset, make_loader
    from dynsparse.layers.head_gating import (
        HeadGatedAttention,
        head_norms,
        set_head_strategy_,
        train_head_predictors_,
    )
    from dynsparse.recipes.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    train = load_dataset("fashion-mnist", split="train", channels=1)
    test_loader = make_loader(load_dataset("fashion-mnist", split="test", channels=1), 1000, shuffle=False)
    kw = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    model.load_state_dict(load_checkpoint(args.checkpoint)["model"])
    model.eval()
    print(f"# dense ViT from {args.checkpoint}")
    held = torch.utils.data.Subset(train, range(60000 - args.calib, 60000))  # images outside the training subset
    calib = [x for x, _ in make_loader(held, 500, shuffle=False)]
    dense_acc = acc(model, test_loader)
    torch.manual_seed(0)  # the predictors' initial weights
    dejavu = ds.sparsify_(copy.deepcopy(model), {"heads": {"gate": "dejavu", "keep": 0.5}})
    recall = train_head_predictors_(dejavu, calib, label=args.label)
    print(f"# held-out recall at keep 0.5 (chance 0.5): {', '.join(f'{v:.3f}' for v in recall.values())}")
    # the static cut: each layer's heads ranked by their mean output norm over the calibration images
    norms: dict[str, torch.Tensor] = {}

    def record(attn, x, o):
        name = attn.heads.owner
        norms[name] = norms.get(name, 0) + head_norms(attn, o, args.label, x).sum(0)

    layers = [m for m in dejavu.modules() if isinstance(m, HeadGatedAttention)]
    for m in layers:
        m._record = record
    with torch.no_grad():
        for x in calib:
            dejavu(x)
    for m in layers:
        m._record = None
    set_head_strategy_(dejavu, "mask")  # same outputs as the gathered path (tested), faster for accuracy runs
    statics = {}
    rows = []
    for keep in args.keeps:
        with ds.budget(dejavu, keep):
            dyn_acc = acc(dejavu, test_loader)
            k = dejavu.blocks[0].attn.heads.num_kept()  # the same count for the static cut
        static = copy.deepcopy(model)
        with torch.no_grad():
            for i, blk in enumerate(static.blocks):
                drop = norms[f"blocks.{i}.attn"].argsort(descending=True)[k:]
                cols = torch.zeros(blk.attn.attn_dim, dtype=torch.bool)
                for h in drop.tolist():
                    cols[h * blk.attn.head_dim : (h + 1) * blk.attn.head_dim] = True
                blk.attn.proj.weight[:, cols] = 0  # the head's output never reaches the residual stream
        statics[keep] = static
        rows.append([keep, k, f"{dense_acc:.2%}", f"{dyn_acc:.2%}", f"{acc(static, test_loader):.2%}"])
    header = ["keep", "heads per layer", "dense", "dejavu, per image (predictors only)", "static, top heads by norm"]
    if args.finetune:
        # fine-tune the host with the predicted heads (masked path in training), at keep 0.5, then refit the
        # predictors to the new heads and evaluate over the knob again
        set_head_strategy_(dejavu, "auto")
        sub = torch.utils.data.Subset(train, range(20000))  # the recipe's training subset
        loader = make_loader(sub, 128, shuffle=True, seed=0, drop_last=True)
        t1 = time.perf_counter()
        train_adam_cosine(dejavu, loader, args.finetune, lr=args.lr)
        recall = train_head_predictors_(dejavu, calib, label=args.label)
        print(
            f"# fine-tuned {args.finetune} epoch(s) at keep 0.5 in {time.perf_counter() - t1:.0f} s; refit recall: "
            + ", ".join(f"{v:.3f}" for v in recall.values())
        )
        set_head_strategy_(dejavu, "mask")
        for row in rows:
            with ds.budget(dejavu, row[0]):
                row.append(f"{acc(dejavu, test_loader):.2%}")
        header.append(f"dejavu after {args.finetune} FT epoch(s) at keep 0.5")
        if 0.5 in statics:  # the static cut fine-tuned the same way, its dropped heads' columns held at zero
            static = statics[0.5]
            zero = [(b.attn.proj.weight, b.attn.proj.weight == 0) for b in static.blocks]

            def rezero():
                with torch.no_grad():
                    for w, z in zero:
                        w.masked_fill_(z, 0.0)

            train_adam_cosine(static, loader, args.finetune, lr=args.lr, after_step=rezero)
            print(f"# static cut at keep 0.5 after the same fine-tuning: {acc(static, test_loader):.2%}")
    print(markdown_table(header, rows, "rrrrrr"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["speed", "layers", "accuracy"], nargs="+", default=["speed"])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 32])
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rounds", type=nonnegative_int, default=0)
    p.add_argument("--checkpoint", default="runs/fashion_vit_hc40/baseline/checkpoint.pt")
    p.add_argument("--label", choices=["norm", "contribution"], default="norm", help="head labels and static ranking")
    p.add_argument("--calib", type=positive_int, default=4000, help="predictor-training images")
    p.add_argument(
        "--finetune", type=nonnegative_int, default=0, help="also fine-tune the host this many epochs at keep 0.5"
    )
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (Adam, cosine to 0.1 lr)")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, fp32")
    t0 = time.perf_counter()
    if "speed" in args.part:
        rows = speed(args)
        print("\n" + markdown_table(HEADER, rows, "lrrrrrrrrr") + f"\n\ntotal {time.perf_counter() - t0:.0f} s")
    if "layers" in args.part:
        rows = layers(args)
        header = ["layer (batch 1)", "dense ms", "gathered ms", "speed-up, gathered (IQR)", "speed-up, masked"]
        print("\n" + markdown_table([*header, "FLOPs-ideal", "achieved / ideal"], rows, "lrrrrrr"))
    if "accuracy" in args.part:
        accuracy(args)


if __name__ == "__main__":
    main()

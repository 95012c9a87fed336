"""Threshold token gates (LTP) on real data: a small ViT on Fashion-MNIST, top-k vs threshold at half the tokens.

Run from the repository root (about 15 minutes on one thread; needs Debian's ``dataset-fashion-mnist``)::

    python benchmarks/token_thresholds_fashion.py

A ViT (embed 96, depth 6, 4 heads, 4x4 patches: 49 tokens + class token) is trained densely (Adam, cosine,
``--epochs`` epochs on ``--train`` images). Then, at block 1, without any training:

* ``cls_attention`` (EViT's top-k) keeps 0.5 of the patch tokens of every image;
* ``threshold`` (LTP), calibrated on 2,000 training images (`calibrate_tokens_`) to keep 0.5 on average:
  each image keeps its own count.

Then each gated model is fine-tuned: ``cls_attention`` with its gathered tokens for ``2 · --finetune``
epochs; ``threshold`` as LTP does, ``--finetune`` epochs with soft masks and the target-keep penalty (target
0.5, weight 1; ``θ`` starts at the calibrated value), then ``--finetune`` epochs with hard masks (``T = 1e-3``,
``θ`` frozen, no penalty), evaluated at its learned thresholds (``keep=None``) and re-calibrated at
``keep=0.5``. Accuracy on the 10,000 test images; FLOPs
per image from ``torch.utils.flop_counter`` over the test set's first 1,000 images (gates included).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, train_adam_cosine

ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4)


def finetune(model, loader, epochs: int, lr: float) -> None:
    """Adam, constant lr, cross-entropy + the gates' penalty (`ds.penalty`)."""
    import dynsparse as ds
    from dynsparse.data import set_epoch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        set_epoch(loader, 100 + epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + ds.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def kept_stats(model, x) -> str:
    """Patch tokens kept per image after the gate at block 1: mean and range."""
    seen = []
    hook = model.blocks[1].register_forward_hook(
        lambda mod, a, out: seen.append(
            mod._token_state.packing.lengths if mod._token_state.packing else [out.shape[1]] * out.shape[0]
        )
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    n = torch.tensor(seen[0], dtype=torch.float) - 1
    return f"{n.mean():.1f} of 49 (min {int(n.min())}, max {int(n.max())})"


def main() -> None:
    import timm

    import dynsparse as ds
    from dynsparse.data import load_dataset, make_loader
    from dynsparse.layers.tokens import calibrate_tokens_

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--finetune", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train = load_dataset("fashion-mnist", "train")
    train = torch.utils.data.Subset(train, range(args.train))
    test = load_dataset("fashion-mnist", "test")
    loader = make_loader(train, batch_size=128, shuffle=True, seed=0)
    test_loader = make_loader(test, batch_size=1000, shuffle=False)
    calib = torch.stack([train[i][0] for i in range(2000)])
    probe = torch.stack([test[i][0] for i in range(1000)])

    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    train_adam_cosine(dense, loader, args.epochs, lr=2e-3)
    dense.eval()
    base_flops = ds.flops.count_flops(dense, probe)
    rows = [("dense", accuracy(dense, test_loader), 1.0, "49 of 49")]
    print(f"dense {rows[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def report(name, m):
        rows.append((name, accuracy(m, test_loader), ds.flops.count_flops(m, probe) / base_flops, kept_stats(m, probe)))
        print(f"{name}: {rows[-1][1]:.4f}, FLOPs {rows[-1][2]:.1%}, kept {rows[-1][3]}", flush=True)

    topk = ds.sparsify_(copy.deepcopy(dense), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    thr = ds.sparsify_(copy.deepcopy(dense), {"tokens": {"gate": "threshold", "blocks": [1], "target": 0.5}})
    thr.blocks[1].tokens.gate.weight = 1.0
    ds.set_budget_(thr, 0.5)
    calibrate_tokens_(thr, calib.split(500))
    report("cls_attention top-k 0.5, no training", topk.eval())
    report("threshold calibrated 0.5, no training", thr.eval())
    with torch.no_grad():  # start the learned threshold at the calibrated one
        thr.blocks[1].tokens.gate.threshold.copy_(thr.blocks[1].tokens.gate.theta())
    e = args.finetune
    finetune(topk, loader, e, 5e-4)
    report(f"cls_attention top-k 0.5, {e} epoch(s) fine-tuned", topk)
    finetune(topk, loader, e, 5e-4)
    report(f"cls_attention top-k 0.5, {2 * e} epoch(s) fine-tuned", topk)
    finetune(thr, loader, e, 5e-4)
    ds.set_budget_(thr, None)
    g = thr.blocks[1].tokens.gate
    report(f"threshold learned θ = {float(g.threshold.detach()):.3f}, {e} soft epoch(s)", thr)
    g.temperature, g.weight = 1e-3, 0.0  # LTP's second stage: hard masks, fixed threshold
    g.threshold.requires_grad_(False)
    finetune(thr, loader, e, 5e-4)
    report(f"  + {e} hard-mask epoch(s)", thr)
    ds.set_budget_(thr, 0.5)
    calibrate_tokens_(thr, calib.split(500))
    report("  same, re-calibrated keep 0.5", thr)
    print("\n| model | test acc | FLOPs vs dense | patch tokens kept per image after block 1 |")
    print("|---|---:|---:|---|")
    for name, acc, fl, kept in rows:
        print(f"| {name} | {acc:.2%} | {fl:.1%} | {kept} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

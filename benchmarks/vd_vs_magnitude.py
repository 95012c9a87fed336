"""Magnitude pruning of LeNet-300-100 at increasing sparsity, to compare with sparse VD at the same error.

Run: ``python benchmarks/vd_vs_magnitude.py [--dataset mnist] [--threads 1]``

The protocol gives magnitude pruning the same dense start as the sparse-VD recipe
(``recipes/mnist_lenet300_svd.yaml``: 10 epochs of Adam 1e-3, cosine) and then prunes gradually with
fine-tuning, as Han et al. 2015 do: at each level the smallest-magnitude weights of each layer are masked (a
layer-wise level, the paper's way; the output layer keeps at least 10 % of its weights at each level,
following Frankle & Carbin's smaller rate for it), then the masked network is fine-tuned for
``--finetune`` epochs with the masks re-applied after every step. It prints the test error at each level.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dynsparse.data import load_dataset, make_loader
from dynsparse.models import LeNet300100

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, train_adam_cosine


def evaluate(model: nn.Module, loader) -> float:
    """Test accuracy in [0, 1]."""
    return accuracy(model, loader)


def train(model, loader, epochs, lr, masks=None, seed=0):
    """`train_adam_cosine`, with the masks re-applied to the weights after every step."""

    def reapply() -> None:
        with torch.no_grad():
            for layer, m in masks.items():
                layer.weight.mul_(m)

    train_adam_cosine(model, loader, epochs, lr, seed, reapply if masks else None)


def layer_masks(model: LeNet300100, sparsity: float) -> dict[nn.Linear, torch.Tensor]:
    masks = {}
    for layer in (model.fc1, model.fc2, model.fc3):
        s = min(sparsity, 0.9) if layer is model.fc3 else sparsity
        w = layer.weight.detach().abs().flatten()
        k = round(s * w.numel())
        mask = torch.ones_like(w)
        if k:
            mask[torch.argsort(w, stable=True)[:k]] = 0
        masks[layer] = mask.view_as(layer.weight)
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-epochs", type=int, default=10)
    ap.add_argument("--finetune", type=int, default=3)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_set = load_dataset(args.dataset, split="train")
    test_loader = make_loader(load_dataset(args.dataset, split="test"), 1000, shuffle=False, seed=0)
    loader = make_loader(train_set, 100, shuffle=True, seed=0, drop_last=True)
    model = LeNet300100()
    t0 = time.perf_counter()
    train(model, loader, args.dense_epochs, 1e-3)
    dense_err = 1 - evaluate(model, test_loader)
    print(f"{args.dataset}: dense LeNet-300-100 after {args.dense_epochs} epochs: test error {100 * dense_err:.2f}%")
    print("| weights pruned (all layers) | test error | compression |")
    print("|---:|---:|---:|")
    pruned = copy.deepcopy(model)
    for i, level in enumerate(args.levels):
        masks = layer_masks(pruned, level)
        with torch.no_grad():
            for layer, m in masks.items():
                layer.weight.mul_(m)
        train(pruned, loader, args.finetune, 1e-3, masks, seed=i + 1)
        err = 1 - evaluate(pruned, test_loader)
        total = sum(m.numel() for m in masks.values())
        zero = sum(int((m == 0).sum()) for m in masks.values())
        print(f"| {100 * zero / total:.2f}% | {100 * err:.2f}% | {total / (total - zero):.1f}x |")
    print(f"({time.perf_counter() - t0:.0f} s, {args.threads} thread)")


if __name__ == "__main__":
    main()

"""Pruning at initialization on MNIST LeNet-300-100: SNIP, GraSP and SynFlow against random pruning.

Run: ``python benchmarks/prune_at_init.py [--epochs 10] [--seeds 0 1 2] [--sparsities 0.95 0.98] [--threads 1]``

The SNIP paper's setting (Lee et al. 2019; methods.md 2.3-2.5). For each seed, one LeNet-300-100 is built
with a variance-scaling initialisation (Kaiming normal, fan-in, ReLU gain; biases 0), and every method prunes
a copy of that same network, **globally** over the weights of all three layers (biases are never pruned):

* ``snip``: ``|w ⊙ ∂L/∂w|`` on one mini-batch of 100 training images;
* ``grasp``: ``θ ⊙ Hg`` (GraSP's ``-S``, so the lowest go) on 10 images per class, logits / T with T = 200;
* ``synflow``: data-free, 100 rounds with the exponential schedule, on a float64 copy in eval mode;
* ``random``: i.i.d. scores, pruned to the same sparsity **in every layer** (uniform layer-wise; global random
  pruning gives the same per-layer densities in expectation, Synaptic-Flow's ``Rand``);
* ``random-snip``: i.i.d. scores at **SNIP's per-layer densities** of the same seed (the sanity-check control:
  only the choice of weights inside each layer differs from SNIP).

The masked network is then trained with Adam (lr 1e-3, batch 100, cosine decay to 0.1x) for ``--epochs``
epochs; the masks stay fixed (``MaskedLinear`` gives masked weights no effect and zero gradient). A dense
network from the same initialisation is trained the same way as a reference. The script prints the test error
of every run, a mean ± std table per method and sparsity, and the kept fraction of each layer.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dynsparse.data import load_dataset, make_loader, set_epoch
from dynsparse.importance import grasp, random, snip, synflow, unstructured_masks
from dynsparse.models import LeNet300100
from dynsparse.prune import apply_masks_, sparsity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy, train_adam_cosine

METHODS = ("snip", "grasp", "synflow", "random", "random-snip")
LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")


def evaluate(model: nn.Module, loader) -> float:
    """Test error in [0, 1]."""
    return 1 - accuracy(model, loader)


def train(model: nn.Module, loader, epochs: int, lr: float, seed: int) -> None:
    """Adam with a cosine decay to 0.1·lr; the data order depends on ``seed`` and the epoch only."""
    train_adam_cosine(model, loader, epochs, lr, seed)


def init_model(seed: int, image_size: int) -> LeNet300100:
    """LeNet-300-100 at a variance-scaling init: Kaiming normal (fan-in, ReLU gain) weights, zero biases."""
    torch.manual_seed(seed)
    model = LeNet300100(img_size=image_size)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def balanced_batch(dataset: Dataset, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random examples of every class (GraSP's ``samples_per_class``)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    picked: dict[int, list[int]] = defaultdict(list)
    for i in order:
        label = int(dataset[i][1])
        if len(picked[label]) < per_class:
            picked[label].append(i)
    idx = [i for c in sorted(picked) for i in picked[c]]
    xs, ys = zip(*(dataset[i] for i in idx), strict=True)
    return torch.stack(xs), torch.as_tensor(ys)


def scores_for(
    method: str, model: nn.Module, target: float, train_set: Dataset, seed: int, snip_density: dict[str, float]
) -> dict[str, torch.Tensor]:
    """Keep masks ``{param_fqn: bool}`` of ``method`` at sparsity ``target`` for ``model`` (not modified)."""
    if method == "snip":
        loader = make_loader(train_set, 100, shuffle=True, seed=seed)
        set_epoch(loader, 10_000)
        batch = next(iter(loader))
        return unstructured_masks(snip(model, F.cross_entropy, batch), target)
    if method == "grasp":
        batch = balanced_batch(train_set, 10, seed)
        return unstructured_masks(grasp(model, F.cross_entropy, batch, temperature=200.0), target)
    if method == "synflow":
        shape = tuple(next(iter(make_loader(train_set, 1, shuffle=False)))[0].shape[1:])
        return unstructured_masks(synflow(model, shape, sparsity=target, iterations=100), target)
    g = torch.Generator().manual_seed(seed + 12345)
    scores = random(model, g)
    if method == "random":
        return unstructured_masks(scores, target, scope="layer")
    if method == "random-snip":
        return {k: unstructured_masks({k: s}, 1 - snip_density[k], scope="layer")[k] for k, s in scores.items()}
    raise ValueError(f"unknown method {method!r}")


def synthetic(n: int, image_size: int, seed: int) -> TensorDataset:
    """Random images and labels (for a smoke run without the real data)."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, image_size, image_size, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def fmt(values: Sequence[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv: Sequence[str] | None = None) -> dict[tuple[str, float], list[float]]:
    """Run the benchmark; returns ``{(method, sparsity): [test error per seed]}`` (``("dense", 0.0)`` too)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.95, 0.98])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--synthetic", type=int, default=0, help="use N random examples instead of the dataset")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 28
    if args.synthetic:
        train_set, test_set = synthetic(args.synthetic, size, 0), synthetic(args.synthetic, size, 1)
    else:
        train_set, test_set = load_dataset(args.dataset, split="train"), load_dataset(args.dataset, split="test")
    test_loader = make_loader(test_set, 1000, shuffle=False)
    t0 = time.perf_counter()
    errors: dict[tuple[str, float], list[float]] = defaultdict(list)
    kept: dict[tuple[str, float], list[list[float]]] = defaultdict(list)
    methods = [m for m in METHODS if m in args.methods]
    if "random-snip" in methods and "snip" not in methods:
        methods.insert(0, "snip")
    for seed in args.seeds:
        init = init_model(seed, size)
        loader = make_loader(train_set, 100, shuffle=True, seed=seed, drop_last=True)
        dense = copy.deepcopy(init)
        train(dense, loader, args.epochs, args.lr, seed)
        errors[("dense", 0.0)].append(evaluate(dense, test_loader))
        print(
            f"seed {seed} dense: {100 * errors[('dense', 0.0)][-1]:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True
        )
        for target in args.sparsities:
            snip_density: dict[str, float] = {}
            for method in methods:
                model = copy.deepcopy(init)
                masks = scores_for(method, model, target, train_set, seed, snip_density)
                apply_masks_(model, masks)
                layers = sparsity(model).layers
                if method == "snip":
                    snip_density = {k: 1 - v for k, v in layers.items()}
                kept[(method, target)].append([1 - layers[k] for k in LAYERS])
                train(model, loader, args.epochs, args.lr, seed)
                err = evaluate(model, test_loader)
                errors[(method, target)].append(err)
                print(
                    f"seed {seed} {method} @ {100 * target:g}%: {100 * err:.2f}% "
                    f"(kept {' / '.join(f'{100 * k:.2f}' for k in kept[(method, target)][-1])} %, "
                    f"{time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    wall = time.perf_counter() - t0
    print(f"\n{args.dataset} LeNet-300-100, {args.epochs} epochs, seeds {args.seeds}: test error %")
    print("| method | sparsity | test error (mean ± std) | per seed |")
    print("|---|---:|---:|---|")
    for (method, target), errs in errors.items():
        per_seed = ", ".join(f"{100 * e:.2f}" for e in errs)
        print(f"| {method} | {100 * target:g}% | {fmt(errs)} | {per_seed} |")
    print("\nKept fraction per layer (mean over seeds, %)")
    print("| method | sparsity | fc1 (784×300) | fc2 (300×100) | fc3 (100×10) |")
    print("|---|---:|---:|---:|---:|")
    for (method, target), rows in kept.items():
        cols = [statistics.mean(r[i] for r in rows) for i in range(len(LAYERS))]
        print(f"| {method} | {100 * target:g}% | " + " | ".join(f"{100 * c:.2f}" for c in cols) + " |")
    print(f"\n({wall:.0f} s, {args.threads} thread)")
    return dict(errors)


if __name__ == "__main__":
    main()

"""Structured channel pruning of a small timm ResNet on Fashion-MNIST: Taylor-FO vs L1 filter norm vs random.

Run: ``python benchmarks/taylor_vs_l1.py [--dense-epochs 3] [--finetune 1] [--seeds 0 1 2] [--threads 1]``;
the paper protocol: ``--layers 2 2 2 2 --dense-epochs 5 --methods taylor-paper l1-paper random-paper``.

Model: timm ``resnet10t`` (one ``BasicBlock`` per stage) with reduced widths: ``channels=(16, 32, 64, 128)``,
``stem_width=16``, one input channel, 10 classes, on 28×28 images. For each seed one dense network is trained
(SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, cosine), and every method starts from that
same dense network. ``ds.prune.structured_(model, {"channels": 0.5}, ...)`` gates the internal channels of
every block (the ``act1`` slot, between ``conv1`` and ``conv2``) and closes half of each gate's channels
(``scope="layer"``, so every method keeps exactly the same widths and FLOPs):

* ``l1``: ``MagnitudeImportance(p=1)``, the L1 norm of each ``conv1`` filter (Li et al. 2017);
* ``taylor``: ``TaylorImportance(order=1)``, ``mean_b (∂L_b/∂z)²`` for the gate ``z`` after ``bn1``/``act1``
  (Molchanov et al. 2019, "Taylor-FO-BN"; a gate after the ReLU gives the same value as one before it), over
  ``--calib`` training batches of 128, in eval mode;
* ``random``: ``RandomImportance`` (seeded);
* ``taylor-iter`` / ``l1-iter``: Molchanov's iterative protocol with this API: during the first steps of
  fine-tuning, every ``--every`` mini-batches the importance is recomputed on the gated model (Taylor over
  ``--iter-calib`` batches) and ``keep_masks`` + ``ds.fix_gates_`` close a few more channels of each gate, in
  ``--steps`` equal steps up to 50 %; closed channels score lowest so they stay closed;
* ``taylor-paper`` / ``l1-paper`` / ``random-paper``: Molchanov 2019's protocol from the trained network
  (``prune_paper``): training goes on at lr ``--prune-lr``; Taylor-FO-BN is read from each training mini-batch's
  own backward pass and averaged with momentum 0.9 since the last step; every ``--every`` mini-batches
  ``--sparsity / --steps`` more of each gate is closed (layer-wise equal ratios, so equal FLOPs), then
  ``--finetune`` epochs of fine-tuning (cosine from ``--prune-lr``) follow the last step, the same for every
  method. ``--layers 2 2 2 2`` gives a deeper, ResNet-18-style network (two blocks per stage);
* ``taylor-global``: one-shot, ranked across the gates without normalisation (Molchanov 2019);
  ``taylor-global-l2`` / ``l1-global-l2``: ranked across the gates after per-gate ℓ2 normalisation (Molchanov
  2017). With a global ranking the widths, hence the FLOPs, differ from the layer-wise methods and between them;
* ``taylor-flops`` / ``l1-flops`` / ``random-flops``: one-shot, ``structured_(model, ["channels"], flops=F)``:
  ranked across the gates by score per FLOP (`dynsparse.importance.flops_keep_masks`) down to the kept FLOPs
  fraction ``F`` of the layer-wise ``--sparsity`` cut (or ``--flops``), so every method lands on the same FLOPs
  (within one channel) and the criterion decides where to cut; Taylor unnormalised (loss units compare across
  layers), L1 after per-gate ℓ2 normalisation; at most ``--max-sparsity`` of any gate.

Then the network is fine-tuned for ``--finetune`` epochs (SGD lr 0.01, cosine; one-shot methods fine-tune the
converted model, iterative ones the gated model, then convert: the same number of steps), converted with
``ds.convert`` (checked against the gated model), and the **converted** model is evaluated. The script prints
per-seed errors (before and after fine-tuning), the mean ± std table, and the FLOPs of each converted model
counted with ``dynsparse.flops.count_flops``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dynsparse as ds
from dynsparse.data import load_dataset, make_loader, set_epoch
from dynsparse.flops import count_flops
from dynsparse.importance import MagnitudeImportance, RandomImportance, TaylorImportance, keep_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import accuracy

METHODS = (
    "l1",
    "taylor",
    "random",
    "taylor-iter",
    "l1-iter",
    "taylor-global",
    "taylor-global-l2",
    "l1-global-l2",
    "taylor-paper",
    "l1-paper",
    "random-paper",
    "taylor-flops",
    "l1-flops",
    "random-flops",
)
DEFAULT_METHODS = ("l1", "taylor", "random", "taylor-iter", "l1-iter")


def build(seed: int, layers: Sequence[int] = (1, 1, 1, 1)) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "resnet10t",
        pretrained=False,
        num_classes=10,
        in_chans=1,
        channels=(16, 32, 64, 128),
        stem_width=16,
        layers=tuple(layers),
    )


def block_widths(model: nn.Module) -> list[int]:
    return [
        blk.conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for blk in stage
    ]


def evaluate(model: nn.Module, loader) -> float:
    """Test error in [0, 1]."""
    return 1 - accuracy(model, loader)


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def train(model: nn.Module, loader, epochs: int, lr: float, seed: int, hook=None) -> None:
    """SGD with a cosine decay; ``hook(step, model)`` runs before every step (iterative pruning)."""
    opt = sgd(model, lr)
    steps, step = max(1, epochs * len(loader)), 0
    model.train()
    for epoch in range(epochs):
        set_epoch(loader, epoch + 1000 * seed)
        for x, y in loader:
            if hook is not None:
                hook(step, model)
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def importance(method: str, seed: int, calib: int) -> object:
    if method.startswith("l1"):
        return MagnitudeImportance(p=1)
    if method.startswith("taylor"):
        return TaylorImportance(order=1, max_batches=calib)
    return RandomImportance(seed=seed)


def calib_batches(train_set, n: int, seed: int, offset: int) -> list:
    loader = make_loader(train_set, 128, shuffle=True, seed=seed)
    set_epoch(loader, 50_000 + offset)
    return list(itertools.islice(loader, n))


def closed_lowest(scores: dict[str, torch.Tensor], gates: dict) -> dict[str, torch.Tensor]:
    """Scores in float64 with every closed channel below every open one, so a closed channel stays closed.

    The open scores are not shifted by a constant: Taylor scores are squared gradients, often far below float32's
    resolution around 1.
    """
    out = {}
    for f, s in scores.items():
        s = s.double()
        out[f] = torch.where(gates[f].keep_mask().cpu(), s, s.min() - 1)
    return out


def prune_iterative_hook(method: str, train_set, seed: int, args):
    """A training hook that closes ``args.sparsity / args.steps`` more of each gate every ``args.every`` steps."""
    scorer = MagnitudeImportance(p=1) if method.startswith("l1") else TaylorImportance(order=1)

    def hook(step: int, model: nn.Module) -> None:
        if step % args.every or step // args.every >= args.steps:
            return
        k = step // args.every + 1
        gates = dict(ds.named_gates(model))
        data = calib_batches(train_set, args.iter_calib, seed, k) if not method.startswith("l1") else None
        scores = scorer(model, data)
        scores = closed_lowest(scores, gates)
        ds.fix_gates_(model, keep_masks(scores, args.sparsity * k / args.steps, scope="layer"))

    return hook


def prune_paper(method: str, dense: nn.Module, loader, seed: int, args, test_loader) -> tuple[nn.Module, float]:
    """Molchanov et al. 2019's protocol from the trained ``dense`` network; returns (gated model, error before FT).

    Training continues (SGD, constant lr ``--prune-lr``) on the gated copy. Every ``--every`` mini-batches, the
    lowest-ranked open channels are closed, ``--sparsity / --steps`` of each gate per step (layer-wise equal
    ratios: every method ends with the same widths, hence the same FLOPs), for ``--steps`` steps. Scores:

    * ``taylor-paper``: Taylor-FO-BN, ``(z·∂L/∂z)²`` of the gate ``z`` after ``bn1``/``act1``, read from the
      training mini-batch's own backward pass (train mode), averaged with momentum 0.9 over the mini-batches
      since the last pruning step (reset after each step);
    * ``l1-paper``: the L1 norm of each ``conv1`` filter at the pruning step;
    * ``random-paper``: random scores, new at each step.

    Closed channels rank lowest, so they stay closed. After the last step the gated model is fine-tuned for
    ``--finetune`` epochs (lr ``--prune-lr``, cosine), the same for every method.
    """
    model = copy.deepcopy(dense)
    ds.sparsify_(model, {"channels": {"gate": "fixed"}})  # all open; before the optimizer is built
    opt = sgd(model, args.prune_lr)
    avg: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    handles: list = []

    def attach(on: bool = True) -> None:  # fix_gates_ swaps the gate modules: hook the new ones
        for h in handles:
            h.remove()
        handles.clear()
        if not on or method != "taylor-paper":
            return
        for fqn, gate in ds.named_gates(model):

            def hook(module, inputs, out, fqn=fqn):
                z = out.detach().clone().requires_grad_(True)
                leaves[fqn] = z
                return z

            handles.append(gate.register_forward_hook(hook))

    attach()
    prune_steps = args.every * args.steps
    ft_steps = max(1, args.finetune * len(loader))
    step, epoch, before = 0, 0, float("nan")
    model.train()
    while step < prune_steps + ft_steps:
        set_epoch(loader, epoch + 1000 * (seed + 1))
        epoch += 1
        for x, y in loader:
            if step >= prune_steps + ft_steps:
                break
            t = max(0, step - prune_steps) / ft_steps
            for g in opt.param_groups:
                g["lr"] = args.prune_lr * (1.0 if step < prune_steps else 0.5 * (1 + math.cos(math.pi * t)))
            leaves.clear()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for fqn, z in leaves.items():
                cur = (z.detach() * z.grad).double().pow(2).reshape(-1)
                avg[fqn] = cur if fqn not in avg else 0.9 * avg[fqn] + 0.1 * cur
            step += 1
            if step <= prune_steps and step % args.every == 0:
                k = step // args.every
                gates = dict(ds.named_gates(model))
                if method == "taylor-paper":
                    scores = {f: avg[f] for f in gates}
                elif method == "l1-paper":
                    scores = MagnitudeImportance(p=1)(model, None)
                else:
                    scores = RandomImportance(seed=1000 * seed + k)(model, None)
                scores = closed_lowest(scores, gates)
                ds.fix_gates_(model, keep_masks(scores, args.sparsity * k / args.steps, scope="layer"))
                avg.clear()
                attach()
                if k == args.steps:
                    before = evaluate(model, test_loader)
    attach(on=False)
    return model, before


def layer_cut_flops(dense: nn.Module, sparsity: float, example: torch.Tensor) -> float:
    """Kept FLOPs fraction of the layer-wise cut (``sparsity`` of every gate): the ``*-flops`` methods' budget."""
    model = ds.prune.structured_(copy.deepcopy(dense), {"channels": sparsity}, scope="layer")
    return count_flops(ds.convert(model), example) / count_flops(dense, example)


def synthetic(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def fmt(values: Sequence[float]) -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Run the benchmark; returns ``{method: [test error of the converted model per seed]}`` (and ``"dense"``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--finetune", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of each block's channels removed")
    ap.add_argument("--calib", type=int, default=20, help="calibration batches of 128 for one-shot Taylor")
    ap.add_argument("--every", type=int, default=30, help="iterative: mini-batches between pruning steps")
    ap.add_argument("--steps", type=int, default=10, help="iterative: number of pruning steps")
    ap.add_argument("--prune-lr", type=float, default=0.01, help="*-paper: lr while pruning and of the fine-tuning")
    ap.add_argument("--layers", type=int, nargs=4, default=[1, 1, 1, 1], help="blocks per stage (2 2 2 2: 18-style)")
    ap.add_argument("--iter-calib", type=int, default=5, help="iterative: Taylor batches per pruning step")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--flops", type=float, default=None, help="*-flops: kept FLOPs fraction (default: the layer cut's)")
    ap.add_argument("--max-sparsity", type=float, default=0.9, help="*-flops: most of any one gate removed")
    ap.add_argument("--synthetic", type=int, default=0, help="use N random examples instead of the dataset")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.synthetic:
        train_set, test_set = synthetic(args.synthetic, 0), synthetic(args.synthetic, 1)
    else:
        train_set = load_dataset(args.dataset, split="train", channels=1)
        test_set = load_dataset(args.dataset, split="test", channels=1)
    test_loader = make_loader(test_set, 1000, shuffle=False)
    example = test_set[0][0][None]
    t0 = time.perf_counter()
    errors: dict[str, list[float]] = defaultdict(list)
    before: dict[str, list[float]] = defaultdict(list)
    flops: dict[str, list[int]] = defaultdict(list)
    widths: dict[str, list[int]] = {}
    for seed in args.seeds:
        loader = make_loader(train_set, 128, shuffle=True, seed=seed, drop_last=True)
        dense = build(seed, args.layers)
        train(dense, loader, args.dense_epochs, 0.1, seed)
        errors["dense"].append(evaluate(dense, test_loader))
        flops["dense"].append(count_flops(dense, example))
        print(f"seed {seed} dense: {100 * errors['dense'][-1]:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
        for method in args.methods:
            model = copy.deepcopy(dense)
            if method.endswith("-paper"):
                model, pre_ft = prune_paper(method, dense, loader, seed, args, test_loader)
                small = ds.convert(model)
                before[method].append(pre_ft)
            elif method.endswith("-iter"):
                ds.sparsify_(model, {"channels": {"gate": "fixed"}})  # all open; before the optimizer is built
                hook = prune_iterative_hook(method, train_set, seed, args)
                train(model, loader, args.finetune, 0.01, seed + 1, hook=hook)
                small = ds.convert(model)
                before[method].append(float("nan"))
            else:  # one-shot: prune, convert, fine-tune the converted model
                if method.endswith("-flops"):
                    budget = args.flops if args.flops is not None else layer_cut_flops(dense, args.sparsity, example)
                    target, how = (
                        ["channels"],
                        dict(
                            flops=budget,
                            normalize="l2" if method.startswith("l1") else "none",
                            max_sparsity=args.max_sparsity,
                            example_input=example,
                        ),
                    )
                else:
                    target, how = (
                        {"channels": args.sparsity},
                        dict(
                            scope="global" if "-global" in method else "layer",
                            normalize="l2" if method.endswith("-l2") else "none",
                        ),
                    )
                data = calib_batches(train_set, args.calib, seed, 0) if method.startswith("taylor") else None
                ds.prune.structured_(model, target, importance=importance(method, seed, args.calib), data=data, **how)
                small = ds.convert(model)
                before[method].append(evaluate(small, test_loader))
                train(small, loader, args.finetune, 0.01, seed + 1)
                model = None
            if model is not None:
                model.eval()
                small.eval()
                with torch.no_grad():
                    x = next(iter(test_loader))[0][:64]
                    diff = float((model(x) - small(x)).abs().max())
                assert diff < 1e-3, f"converted model differs from the gated one by {diff}"
            err = evaluate(small, test_loader)
            errors[method].append(err)
            flops[method].append(count_flops(small, example))
            widths[method] = block_widths(small)
            pre = "" if math.isnan(before[method][-1]) else f"{100 * before[method][-1]:.2f}% before FT, "
            print(
                f"seed {seed} {method}: {pre}{100 * err:.2f}% after FT, {flops[method][-1] / 1e6:.3f} MFLOPs, "
                f"widths {widths[method]} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    print(
        f"\n{args.dataset}, resnet10t (16-32-64-128, layers {args.layers}), "
        f"{100 * args.sparsity:g}% of block channels, "
        f"{args.dense_epochs} dense epochs, {args.finetune} fine-tuning epoch(s), seeds {args.seeds}: "
        "test error % of the converted model"
    )
    print("| method | MFLOPs (converted) | before FT | after FT (mean ± std) | per seed |")
    print("|---|---:|---:|---:|---|")
    for method, errs in errors.items():
        mflops = "/".join(sorted({f"{f / 1e6:.3f}" for f in flops[method]}))
        pre = fmt(before[method]) if method in before and not math.isnan(before[method][0]) else "–"
        per_seed = ", ".join(f"{100 * e:.2f}" for e in errs)
        print(f"| {method} | {mflops} | {pre} | {fmt(errs)} | {per_seed} |")
    pairs = (
        ("taylor", "l1"),
        ("taylor-iter", "l1-iter"),
        ("taylor-paper", "l1-paper"),
        ("taylor-flops", "l1"),
        ("taylor-flops", "l1-flops"),
        ("taylor-flops", "taylor"),
        ("taylor-flops", "random-flops"),
    )
    for a, b in pairs:
        if a in errors and b in errors:
            diffs = [100 * (x - y) for x, y in zip(errors[a], errors[b], strict=True)]
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            mean = statistics.mean(diffs)
            std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            print(f"paired {a} − {b} (points, per seed): {per_seed}; mean {mean:+.2f} ± {std:.2f}")
    print(f"\n({wall:.0f} s, {args.threads} thread)")
    return dict(errors)


if __name__ == "__main__":
    main()

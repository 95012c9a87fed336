"""Lottery tickets: IMP on MNIST LeNet-300-100 (Frankle & Carbin 2019) and late rewinding on Fashion-MNIST LeNet-5.

Run: ``python benchmarks/lottery.py [--part a|b|both] [--seeds 0 1 2] [--threads 1]``

(a) Frankle & Carbin's LeNet-300-100 setting scaled to minutes: Adam 1.2e-3, batch 60, ``--epochs`` epochs per
round (the paper: 50K iterations), prune 20 % of the remaining weights of fc1 / fc2 and 10 % of the output layer
per round, layer-wise, reset to θ0, ``--rounds`` rounds (11 → 8.7 % of the weights left). At the final sparsity the
ticket is compared with the same masks at a random re-init (``reinit_``) and with the dense network.

(b) Late rewinding (Frankle et al. 2020) on LeNet-5 / Fashion-MNIST: one shared dense training (which saves θ_k at
step ``--rewind-step``), then two IMP runs: rewind to θ_k (later rounds train steps k..T, as open_lth does) and
reset to θ0; plus a random re-init of the θ_k ticket's masks. Larger rates than the paper's (fc1 50 %, conv and
output 25 % per round) so that 3 rounds reach ~15 % of the weights.

Both hold out the last 5,000 training images for validation (never the test set) and print the test accuracy at
the end of training ("final") and at the iteration of minimum validation loss ("early stop", Frankle & Carbin's
protocol). Seeds set the init, the data order and the re-init.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse import prune
from dynsparse.data import load_dataset, make_loader, set_epoch
from dynsparse.data.dataset import ImageTensorDataset
from dynsparse.models import LeNet5, LeNet300100

VAL = 5000


def splits(name: str, train_size: int | None, val_size: int = VAL) -> dict[str, ImageTensorDataset]:
    """The first ``train_size`` of the first 55,000 training images, ``val_size`` of the last 5,000, the test set."""
    full = load_dataset(name, "train")
    images, labels = full.tensors
    n = len(full) - VAL
    m = n if train_size is None else min(train_size, n)
    train = ImageTensorDataset(images[:m], labels[:m], full.classes)
    val = ImageTensorDataset(images[n : n + val_size], labels[n : n + val_size], full.classes)
    return {"train": train, "val": val, "test": load_dataset(name, "test")}


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensorDataset) -> tuple[float, float]:
    """(mean cross-entropy, accuracy)."""
    model.eval()
    loss = correct = 0.0
    images, labels = data.tensors
    for i in range(0, len(data), 250):
        out = model(images[i : i + 250])
        loss += float(F.cross_entropy(out, labels[i : i + 250], reduction="sum"))
        correct += int((out.argmax(-1) == labels[i : i + 250]).sum())
    model.train()
    return loss / len(data), correct / len(data)


def train(model, ticket, loader, data, *, steps: int, start: int = 0, lr: float, eval_every: int) -> dict:
    """Adam from step ``start`` to ``steps`` (a fresh optimizer); data order from (seed, epoch) as in a full run."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = len(loader)
    best = (float("inf"), None, 0)  # (val loss, state, step)
    t = start
    while t < steps:
        set_epoch(loader, t // per_epoch)
        for x, y in itertools.islice(loader, t % per_epoch, None):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t += 1
            if ticket is not None:
                ticket.step(t)
            if t % eval_every == 0 or t == steps:
                val_loss, _ = evaluate(model, data["val"])
                if val_loss < best[0]:
                    best = (val_loss, copy.deepcopy(model.state_dict()), t)
            if t == steps:
                break
    final = early = evaluate(model, data["test"])[1]
    if best[2] != t:  # test accuracy at the minimum-validation-loss iteration
        last = copy.deepcopy(model.state_dict())
        model.load_state_dict(best[1])
        early = evaluate(model, data["test"])[1]
        model.load_state_dict(last)
    return {"final": final, "early": early, "early_step": best[2]}


def fmt(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def table(title: str, rows: dict[str, list[dict]], seeds: list[int]) -> None:
    print(f"\n{title}")
    print("| run | " + " | ".join(f"seed {s} final / early" for s in seeds) + " | mean final | mean early stop |")
    print("|---|" + "---:|" * (len(seeds) + 2))
    for name, res in rows.items():
        cells = " | ".join(f"{100 * r['final']:.2f} / {100 * r['early']:.2f}" for r in res)
        print(f"| {name} | {cells} | {fmt([r['final'] for r in res])} | {fmt([r['early'] for r in res])} |")


def part_a(args) -> None:
    data = splits("mnist", None)
    rows: dict[str, list[dict]] = {}
    curve: dict[int, list[tuple[float, dict]]] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = LeNet300100()
        loader = make_loader(data["train"], 60, shuffle=True, seed=seed, drop_last=True)
        steps = args.epochs * len(loader)
        every = len(loader) // 2

        def train_fn(model, ticket, loader=loader, steps=steps, every=every):
            return train(model, ticket, loader, data, steps=steps, lr=1.2e-3, eval_every=every)

        out = prune.imp(model, train_fn, rounds=args.rounds, rate=0.2, rates={"fc3": 0.1}, scope="layer")
        for r in out.rounds:
            curve.setdefault(r.round, []).append((r.sparsity, r.result))
            print(f"  seed {seed} round {r.round}: {100 * (1 - r.sparsity):.1f}% of weights, {r.result}", flush=True)
        final = out.rounds[-1]
        out.ticket.reinit_(seed + 1000)
        reinit = train_fn(model, None)
        print(f"  seed {seed} reinit: {reinit} ({time.perf_counter() - t0:.0f} s)", flush=True)
        left = f"{100 * (1 - final.sparsity):.1f}%"
        rows.setdefault("dense (100% of weights)", []).append(out.rounds[0].result)
        rows.setdefault(f"IMP ticket, reset to θ0 ({left})", []).append(final.result)
        rows.setdefault(f"same masks, random re-init ({left})", []).append(reinit)
    wall = time.perf_counter() - t0
    print(f"\n(a) MNIST LeNet-300-100, {args.rounds} rounds x {args.epochs} epochs, seeds {args.seeds}")
    print("\n| round | weights left | fc1 / fc2 / fc3 left | test acc final | test acc early stop | early-stop step |")
    print("|---:|---:|---|---:|---:|---:|")
    for r, items in curve.items():
        res = [x for _, x in items]
        left = 100 * (1 - items[0][0])
        layer_left = "/".join(f"{100 * 0.8**r:.1f}" for _ in range(2)) + f"/{100 * 0.9**r:.1f}"
        mean_step = statistics.mean(x["early_step"] for x in res)
        print(f"| {r} | {left:.1f}% | {layer_left} | {fmt([x['final'] for x in res])} | ", end="")
        print(f"{fmt([x['early'] for x in res])} | {mean_step:.0f} |")
    table("Test accuracy (%) at the final sparsity:", rows, args.seeds)
    print(f"\n(a) wall time {wall:.0f} s on {args.threads} thread(s)")


def part_b(args) -> None:
    data = splits("fashion-mnist", args.train_size, args.val_size)
    rows: dict[str, list[dict]] = {}
    rates = {"conv*": 0.25, "fc2": 0.25}
    t0 = time.perf_counter()
    k = args.rewind_step
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = LeNet5()
        theta0 = copy.deepcopy(model)
        loader = make_loader(data["train"], 60, shuffle=True, seed=seed, drop_last=True)
        steps = args.steps

        def fit(m, ticket, start=0, loader=loader, steps=steps):
            return train(m, ticket, loader, data, steps=steps, start=start, lr=1.2e-3, eval_every=args.eval_every)

        late = prune.LotteryTicket(model, rate=0.5, rates=rates, rewind_step=k)
        dense = fit(model, late)  # saves θ_k at step k
        late.prune_()
        reset_model = prune.apply_masks_(copy.deepcopy(theta0), prune.masks(model))
        reset = prune.LotteryTicket(reset_model, rate=0.5, rates=rates)  # θ0 with the round-1 masks
        late.rewind_()
        for r in range(1, args.rounds + 1):
            res_late = fit(model, late, start=k)
            res_reset = fit(reset_model, reset)
            print(f"  seed {seed} round {r}: {100 * (1 - late.sparsity().overall):.1f}% / ", end="")
            print(f"{100 * (1 - reset.sparsity().overall):.1f}% left: θ_k {res_late}, θ0 {res_reset}", flush=True)
            if r < args.rounds:
                late.prune_().rewind_()
                reset.prune_().rewind_()
        control = prune.reinit_(copy.deepcopy(model), seed + 1000)
        res_reinit = fit(control, None)
        print(f"  seed {seed} reinit: {res_reinit} ({time.perf_counter() - t0:.0f} s)", flush=True)
        left = f"{100 * (1 - late.sparsity().overall):.1f}%"
        rows.setdefault("dense (100% of weights)", []).append(dense)
        rows.setdefault(f"IMP, rewind to θ_k, k={k} ({left})", []).append(res_late)
        rows.setdefault(f"IMP, reset to θ0 ({100 * (1 - reset.sparsity().overall):.1f}%)", []).append(res_reset)
        rows.setdefault(f"θ_k ticket's masks, random re-init ({left})", []).append(res_reinit)
    wall = time.perf_counter() - t0
    print(f"\n(b) Fashion-MNIST LeNet-5, {len(data['train'])} training images, {args.steps} steps per training, ")
    print(f"{args.rounds} rounds, rewind step {k}, seeds {args.seeds}")
    table("Test accuracy (%) at the final sparsity:", rows, args.seeds)
    print(f"\n(b) wall time {wall:.0f} s on {args.threads} thread(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="pruning rounds (default: 11 for a, 3 for b)")
    ap.add_argument("--epochs", type=int, default=3, help="(a) epochs per round")
    ap.add_argument("--steps", type=int, default=800, help="(b) iterations per training (batch 60)")
    ap.add_argument("--rewind-step", type=int, default=80, help="(b) k of late rewinding")
    ap.add_argument("--train-size", type=int, default=None, help="(b) training images (default: all 55,000)")
    ap.add_argument("--val-size", type=int, default=2500, help="(b) validation images used (of the 5,000 held out)")
    ap.add_argument("--eval-every", type=int, default=200, help="(b) iterations between validation checks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("a", "both"):
        part_a(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 11}))
    if args.part in ("b", "both"):
        part_b(argparse.Namespace(**{**vars(args), "rounds": args.rounds or 3}))


if __name__ == "__main__":
    main()

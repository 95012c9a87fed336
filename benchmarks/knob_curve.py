"""The run-time knob on a trained model: test accuracy, FLOPs and measured speed-up at each token budget.

Run after ``dynsparse train RECIPE --out RUN`` of a recipe with token gates and ``baseline: true``::

    python benchmarks/knob_curve.py recipes/fashion_vit_tokens50.yaml --run runs/fashion_vit_tokens50 \
        --png docs/results/knob_fashion_vit_tokens50.png

It loads the converted model (``RUN/model.safetensors``, dynamic gates kept as run-time modules) and the dense
baseline the recipe trained (``RUN/baseline``, or ``--dense-run DIR``'s), sets every gate's ``keep`` to each value
in turn with ``dynsparse.budget`` (no retraining), and measures the test accuracy on the whole test set, the FLOPs
per image relative to dense (``torch.utils.flop_counter``, 64 test images each counted alone, averaged), and the
latency against the dense model side by side (interleaved rounds, median of paired ratios, one thread) at batch 1
and 64 on real test images (each image makes its own decisions).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dynsparse as ds
from dynsparse.bench import knob_curve
from dynsparse.commands.args import positive_int
from dynsparse.data import load_dataset, make_loader
from dynsparse.recipes import load_recipe
from dynsparse.recipes.run import dense_baseline
from dynsparse.recipes.train import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--run", required=True, help="output dir of `dynsparse train` for this recipe")
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=positive_int, default=15)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument(
        "--dense-run",
        default=None,
        help="take the dense baseline from this run dir instead (a recipe whose dense baseline is the same)",
    )
    p.add_argument("--png", default=None, help="where to write the plot (default RUN/knob.png)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe)
    run = Path(args.run)
    model = ds.load(run / "model.safetensors").eval()
    base = Path(args.dense_run or run) / "baseline"
    if not (base / "checkpoint.pt").exists():
        raise SystemExit(f"{base}: no dense baseline (the recipe needs baseline: true, or give --dense-run)")
    dense = Trainer(dense_baseline(recipe), base, resume=True, progress=False).run().eval()
    d = recipe.data
    test = load_dataset(d.dataset, "test", root=d.root, image_size=d.image_size, channels=d.channels)
    loader = make_loader(test, d.eval_batch_size, shuffle=False, seed=0)

    def accuracy(m) -> float:
        correct = total = 0
        for x, y in loader:
            correct += int((m(x).argmax(-1) == y).sum())
            total += len(y)
        return correct / total

    x = torch.stack([test[i][0] for i in range(max(args.batches))])
    curve = knob_curve(
        model, dense, accuracy, x, keeps=args.keeps, batch_sizes=args.batches, rounds=args.rounds, threads=args.threads
    )
    print(f"{recipe.name}: budget sweep, {args.threads} thread, {args.rounds} interleaved rounds per point")
    print(curve.table())
    png = curve.plot(args.png or run / "knob.png", title=f"{recipe.name}: run-time knob")
    (run / "knob.json").write_text(
        json.dumps({"dense_metric": curve.dense_metric, "points": [vars(p) for p in curve.points]}, indent=1)
    )
    print(f"wrote {png}, {run / 'knob.json'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

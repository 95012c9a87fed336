"""CPU latency of compressed all-MiniLM-L6-v2 structures, from their SlicePlans (issue #7).

Latency depends on the structure only, not on the trained values, so a model compressed elsewhere (e.g.
``minilm_compress.py --device cuda --save-plan PLAN`` on a GPU machine) is timed here by replaying its plan on the
dense model (`ds.apply_plan`). Beside each plan: the dense model and the uniform magnitude baseline at the same
fraction of heads and neurons (``--baseline-keep``), as ``minilm_compress.py`` builds it. Batch 1 x 128 tokens,
one thread, interleaved rounds in rotating order, speed-up = median of the paired ratios dense / model.

Run: ``python benchmarks/minilm_latency.py PLAN.json [PLAN.json ...] --rounds 60``
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _minilm import forward_step, magnitude_pruned
from _timing import count_flops, interleaved_rounds, markdown_table, paired_ratios, spread

import dynsparse as ds
from dynsparse.commands.args import positive_int


def main(argv: Sequence[str] | None = None) -> list[list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="+", help="SlicePlan JSON files of converted MiniLM models")
    ap.add_argument("--baseline-keep", type=float, default=0.5, help="kept fraction of heads/neurons, magnitude")
    ap.add_argument("--rounds", type=positive_int, default=60)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args(argv)
    names = ["dense", *(Path(p).stem for p in args.plans)] + ["magnitude (uniform)"] * (args.baseline_keep < 1)
    same = sorted({n for n in names if names.count(n) > 1})
    if same:  # a later model replaced the earlier one of its name (a dense.json the dense reference)
        ap.error(f"plans {args.plans} give the same row name {same} twice: rename the files")

    from dynsparse.pretrained import load_pretrained

    torch.set_num_threads(args.threads)
    dense = load_pretrained("all-minilm-l6-v2").model.eval()
    ids = torch.randint(1000, 20000, (1, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    models = {"dense": dense}
    for path in args.plans:
        plan = ds.SlicePlan.from_json(Path(path).read_text())
        models[Path(path).stem] = ds.apply_plan(copy.deepcopy(dense), plan).eval()
    if args.baseline_keep < 1:
        models["magnitude (uniform)"] = magnitude_pruned(copy.deepcopy(dense), 1.0 - args.baseline_keep).eval()
    flops = {name: count_flops(m, ids, mask) for name, m in models.items()}

    t = interleaved_rounds(
        {name: forward_step(m, ids, mask) for name, m in models.items()}, rounds=args.rounds, warmup=3
    )
    rows = []
    for name in models:
        sp = spread(paired_ratios(t.cpu["dense"], t.cpu[name]))
        wall = spread(paired_ratios(t.wall["dense"], t.wall[name]))
        ideal = flops["dense"] / flops[name]
        rows.append(
            [
                name,
                f"{100 * flops[name] / flops['dense']:.1f} %",
                f"{1e3 * spread(t.cpu[name]).median:.1f}",
                f"{sp.median:.2f}× [{sp.q1:.2f}, {sp.q3:.2f}]",
                f"{wall.median:.2f}×",
                f"{ideal:.2f}×",
                f"{sp.median / ideal:.2f}",
            ]
        )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"batch 1 x 128 tokens, {args.threads} thread(s), {args.rounds} interleaved rounds; load {load}")
    header = ["model", "kept FLOPs", "ms (CPU, median)", "speed-up (CPU) [IQR]", "speed-up (wall)", "ideal", "of ideal"]
    print(markdown_table(header, rows, "lrrrrrr"))
    return rows


if __name__ == "__main__":
    main()

"""``dynsparse bench MODEL [MODEL ...]``: latency of model files side by side, with FLOPs and parameters."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "bench", "format_bench", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .args import add_input_options, nonnegative_int, path_arg, positive_int

    p = sub.add_parser(
        "bench",
        help="CPU latency of model files side by side (interleaved rounds), with FLOPs and parameters",
        description="Time model files in one process: warm-up, then interleaved rounds (the order rotates each "
        "round); speed-up is the median over rounds of the reference's time / the model's time in that round. "
        "Inputs are random normal, a different one per batch row.",
    )
    p.add_argument(
        "models", type=path_arg, nargs="+", metavar="MODEL", help="model files (converted, or gated checkpoints)"
    )
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--rounds", type=positive_int, default=15, help="timed rounds per batch size (default: 15)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed rounds first (default: 3)")
    p.add_argument(
        "--dense",
        action="store_true",
        help="add the dense architecture of the first file's arch (random weights) as the reference",
    )
    add_input_options(
        p,
        input_help="shape of one input (default: the input_shape stored in the files by `dynsparse train`)",
        json_help="also write the results as JSON",
    )
    p.set_defaults(func=run)
    return p


def bench(
    paths: list[str],
    *,
    batches: list[int],
    threads: int = 1,
    rounds: int = 15,
    warmup: int = 3,
    dense: bool = False,
    input_shape: tuple[int, int, int] | None = None,
    flops_inputs: int = 16,
) -> dict[str, Any]:
    """Load the files, count FLOPs and parameters, time every batch size; returns the JSON-ready result."""
    from ..bench.latency import compare_latency
    from .modelfile import (
        build_dense,
        check_runs,
        count_params,
        flops_per_input,
        is_dynamic,
        load_model_file,
        model_dtype,
        random_inputs,
        resolve_input_shape,
        with_input_dtype,
    )

    files = [load_model_file(p) for p in paths]
    shape, source = resolve_input_shape(files, input_shape)
    named: dict[str, Any] = {}
    if dense:
        named["dense"] = ("dense", build_dense(files[0].arch, files[0].path), "dense")
    for f in files:
        name, i = f.path, 2
        while name in named:  # the same file twice: keep both rows apart
            name, i = f"{f.path} #{i}", i + 1
        named[name] = (f.path, f.model, f.kind)
    x_flops = random_inputs(shape, flops_inputs, seed=1)
    rows = []
    for name, (path, model, kind) in named.items():
        x = x_flops.to(model_dtype(model))
        check_runs((path, model), x[:1], source)
        total, nonzero = count_params(model)
        dyn = is_dynamic(model)
        rows.append(
            {
                "name": name,
                "path": path,
                "kind": kind,
                "dynamic": dyn,
                "flops": flops_per_input(model, x),
                "flops_inputs": flops_inputs if dyn else 1,
                "params": total,
                "nonzero_params": nonzero,
            }
        )
    ref = rows[0]
    for r in rows:
        r["ideal_speedup"] = ref["flops"] / r["flops"] if r["flops"] else None
    result: dict[str, Any] = {
        "threads": threads,
        "rounds": rounds,
        "warmup": warmup,
        "input_shape": list(shape),
        "input_source": source,
        "reference": ref["name"],
        "dense_arch": files[0].arch if dense else None,
        "models": rows,
        "batches": [],
    }
    # one input, in the reference's dtype; a model of another dtype (a bfloat16 file) gets it cast, in its time
    dtype = model_dtype(named[ref["name"]][1])
    models = {name: with_input_dtype(model, dtype) for name, (_, model, _) in named.items()}
    for b in batches:
        x = random_inputs(shape, b, seed=2).to(dtype)
        res = compare_latency(models, x, reference=ref["name"], rounds=rounds, warmup=warmup, threads=threads)
        # the ideal of the inputs timed here: a per-input model's FLOPs on other inputs would not say what it skipped
        timed = {r["name"]: _timed_flops(r, named[r["name"]][1], x) for r in rows}
        per = []
        for r in rows:
            speedup = res.speedup[r["name"]]
            ideal = timed[ref["name"]] / timed[r["name"]] if timed[r["name"]] else None
            per.append(
                {
                    "name": r["name"],
                    "median_ms": 1e3 * res.median_s[r["name"]],
                    "speedup": speedup,
                    "ideal_speedup": ideal,
                    "achieved_over_ideal": speedup / ideal if ideal else None,
                }
            )
        result["batches"].append({"batch": b, "rows": per})
    return result


def _timed_flops(row: dict[str, Any], model: Any, x: Any) -> float:
    """FLOPs per input of ``model`` on the timed batch ``x``: the mean over its inputs, each counted alone, for a
    per-input model; the static count (``row["flops"]``) otherwise."""
    from .modelfile import flops_per_input, model_dtype

    return flops_per_input(model, x.to(model_dtype(model))) if row["dynamic"] else row["flops"]


def format_bench(r: dict[str, Any]) -> str:
    """Plain-text tables of a `bench` result, one per batch size."""
    from .modelfile import si

    models = {m["name"]: m for m in r["models"]}
    width = max(len("model"), *(len(n) for n in models))
    threads = f"{r['threads']} thread{'s' if r['threads'] != 1 else ''}"
    lines = [
        f"{threads} (--threads), median of {r['rounds']} interleaved rounds after {r['warmup']} warm-up rounds; "
        f"input {'x'.join(map(str, r['input_shape']))} ({r['input_source']}), random normal",
        f"reference: {r['reference']}"
        + (f" ({r['dense_arch']['name']}, random weights, no plan)" if r["dense_arch"] else ""),
    ]
    if any(m["dynamic"] for m in r["models"]):
        lines.append(
            "per-input models: FLOPs are the mean over distinct random inputs (*), each counted alone; "
            "ideal is counted on the inputs timed at each batch size"
        )
    head = (
        f"{'model':<{width}}  {'median ms':>10}  {'speed-up':>8}  {'FLOPs/input':>11}  {'ideal':>6}  "
        f"{'achieved/ideal':>14}  {'params':>12}"
    )
    for b in r["batches"]:
        lines += ["", f"batch {b['batch']}", head]
        for row in b["rows"]:
            m = models[row["name"]]
            flops = si(m["flops"]) + ("*" if m["dynamic"] else " ")
            ideal = f"x{row['ideal_speedup']:.2f}" if row["ideal_speedup"] else "-"
            ach = f"{100 * row['achieved_over_ideal']:.0f}%" if row["achieved_over_ideal"] is not None else "-"
            lines.append(
                f"{row['name']:<{width}}  {row['median_ms']:>10.3f}  {'x' + format(row['speedup'], '.2f'):>8}  "
                f"{flops:>11}  {ideal:>6}  {ach:>14}  {m['params']:>12,}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .modelfile import check_output_file, write_json

    check_output_file(args.json, "--json", inputs=args.models)

    result = bench(
        args.models,
        batches=args.batch,
        threads=args.threads,
        rounds=args.rounds,
        warmup=args.warmup,
        dense=args.dense,
        input_shape=args.input,
        flops_inputs=args.flops_inputs,
    )
    print(format_bench(result))
    write_json(args.json, result)
    return 0

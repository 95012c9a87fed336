"""``dynsparse prune MODEL --out DIR``: one-shot, data-free pruning of a model file (magnitude scores)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "prune", "run"]

#: Unit dimensions the command prunes, and the data-free structured importances (L1 / L2 norm of a unit's weights).
DIMENSIONS = ("channels", "neurons", "heads")
IMPORTANCES = {"l1": {"name": "magnitude", "p": 1}, "l2": {"name": "magnitude", "p": 2}}
#: The files the command may write in its output directory.
OUTPUTS = ("model.safetensors", "gated.safetensors", "plan.json")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .args import fraction_removed, input_shape_arg, path_arg

    p = sub.add_parser(
        "prune",
        help="one-shot, data-free pruning of a model file: weights (--unstructured) or whole units (--channels ...)",
        description="Prune a model file without data, by weight magnitude, and write the result to DIR: "
        "model.safetensors (converted: pruned units are sliced out, pruned weights are zeros) and, for whole "
        "units, gated.safetensors (the fixed gates, for `dynsparse convert` or fine-tuning) and plan.json. Pruning "
        "that needs data or training (Taylor, movement, learned gates, fine-tuning) is a recipe stage: "
        "`dynsparse train`.",
    )
    p.add_argument("model", type=path_arg, metavar="MODEL", help="a converted model file or a gated checkpoint")
    p.add_argument("--out", type=path_arg, required=True, metavar="DIR", help="output directory")
    frac = {"type": fraction_removed, "default": None, "metavar": "R"}
    p.add_argument("--unstructured", **frac, help="fraction of weights zeroed")
    for dim in DIMENSIONS:
        p.add_argument(f"--{dim}", **frac, help=f"fraction of {dim} removed")
    p.add_argument(
        "--importance",
        choices=sorted(IMPORTANCES),
        default="l1",
        help="unit score: L1 or L2 norm of its weights (default: l1); weights are scored by |w|",
    )
    p.add_argument(
        "--scope",
        choices=["global", "layer", "row"],
        default=None,
        help="rank across layers, within each, or (weights only) within each output row (default: global for "
        "weights, layer for units)",
    )
    p.add_argument(
        "--input",
        type=input_shape_arg,
        default=None,
        metavar="C,H,W",
        help="input shape for the output check (default: stored in the file; none: no check)",
    )
    p.set_defaults(func=run)
    return p


def prune(
    path: str,
    out: str,
    *,
    unstructured: float | None = None,
    dimensions: dict[str, float] | None = None,
    importance: str = "l1",
    scope: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Prune the model in ``path``, write ``out/model.safetensors`` (and ``gated.safetensors``); returns a summary.

    The `OUTPUTS` this prune does not write are removed from ``out``: an earlier prune's would not describe the new
    ``model.safetensors``.
    """
    from ..atomic import atomic_write
    from ..convert import convert, save
    from ..convert.io import save_gated
    from ..errors import ConfigError, DynsparseError
    from ..gate_ops import named_gates
    from ..prune import remove_, structured_, unstructured_
    from .modelfile import (
        check_not_input,
        check_runs,
        count_params,
        count_weights,
        is_dynamic,
        load_model_file,
        model_dtype,
        random_inputs,
        resolve_input_shape,
    )

    dimensions = {d: r for d, r in (dimensions or {}).items() if r is not None}
    if scope == "row" and dimensions:
        raise ConfigError("--scope row ranks the weights of each output row (--unstructured), not whole units")
    if unstructured is None and not dimensions:
        raise ConfigError("nothing to prune; pass --unstructured R and/or --channels / --neurons / --heads R")
    check_not_input("--out", out, [Path(out) / name for name in OUTPUTS], [path])
    f = load_model_file(path)
    model = f.model
    before = count_params(model)
    plan = getattr(model, "slice_plan", None)  # a converted file's; a converted file pruned again composes it
    try:
        shape, source = resolve_input_shape([f], input_shape)
    except ConfigError:
        shape = None
    x = random_inputs(shape, 4, seed=0).to(model_dtype(model)) if shape is not None else None
    if x is not None:  # an input the model does not take failed at the conversion check, blamed on the converter
        check_runs(f, x[:1], source)
    if dimensions:
        try:
            structured_(model, dimensions, importance=IMPORTANCES[importance], scope=scope or "layer")
        except DynsparseError as e:  # e.g. --heads of a ResNet: name the file and the flags
            flags = " ".join(f"--{d} {r:g}" for d, r in dimensions.items())
            raise ConfigError(f"{path}: {flags}: {e}") from None
    out_dir = Path(out)
    written = []
    gated = any(True for _ in named_gates(model))
    if gated:
        if dimensions:  # the fixed gates, for `dynsparse convert` or fine-tuning (no --unstructured zeros)
            save_gated(model, out_dir / "gated.safetensors", arch=f.arch, data=f.data)
            written.append("gated.safetensors")
        model = convert(model, verify_inputs=x, static=not is_dynamic(model))
        plan = model.slice_plan
        text = json.dumps(plan.to_dict(), indent=1, sort_keys=True) + "\n"
        atomic_write(out_dir / "plan.json", lambda tmp: Path(tmp).write_text(text))
        written.append("plan.json")
    if unstructured is not None:  # after conversion: the fraction is of the weights the saved model keeps
        remove_(unstructured_(model, unstructured, scope=scope or "global"))
    save(model, out_dir / "model.safetensors", arch=f.arch, plan=plan, data=f.data)
    written.insert(0, "model.safetensors")
    for name in set(OUTPUTS) - set(written):  # an earlier prune's, which do not describe this model.safetensors
        (out_dir / name).unlink(missing_ok=True)
    after = count_params(model)
    return {
        "path": path,
        "out": str(out_dir),
        "files": written,
        "params": [before, after],
        "weights": count_weights(model),
        "checked": x is not None,
    }


def run(args: argparse.Namespace) -> int:
    r = prune(
        args.model,
        args.out,
        unstructured=args.unstructured,
        dimensions={d: getattr(args, d) for d in DIMENSIONS},
        importance=args.importance,
        scope=args.scope,
        input_shape=args.input,
    )
    (n0, z0), (n1, z1) = r["params"]
    print(f"pruned {r['path']} -> {r['out']}: wrote {', '.join(r['files'])}")
    print(f"parameters: {n0:,} -> {n1:,} ({100 * n1 / max(n0, 1):.1f}%), non-zero {z0:,} -> {z1:,}")
    w, wz = r["weights"]
    print(f"Linear / Conv2d weights: {w - wz:,} of {w:,} zero ({100 * (w - wz) / max(w, 1):.1f}%)")
    if not r["checked"]:
        print("no input shape stored in the file: the converted model was not checked against the pruned one")
    return 0

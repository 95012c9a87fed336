"""``dynsparse analyse MODEL``: what is in a model file, layer by layer, against its dense architecture."""

from __future__ import annotations

import argparse
import json
from typing import Any

from torch import Tensor, nn

__all__ = ["add_parser", "analyse", "format_analysis", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .args import add_input_options, path_arg, positive_int

    p = sub.add_parser(
        "analyse",
        help="per layer: shape, parameters, non-zeros, FLOPs, and what was kept of the dense architecture",
        description="Analyse a converted model (model.safetensors) or a gated checkpoint (gated.safetensors): "
        "Linear, Conv and Norm layers and gates, with the dense architecture of the file's arch for comparison.",
    )
    p.add_argument("model", type=path_arg, metavar="MODEL", help="a converted model file or a gated checkpoint")
    add_input_options(
        p,
        input_help="shape of one input for the FLOPs (default: the input_shape stored in the file; none: no FLOPs)",
        json_help="also write the analysis as JSON",
    )
    p.add_argument("--top", type=positive_int, default=None, metavar="N", help="only the N layers with most FLOPs")
    p.set_defaults(func=run)
    return p


def _is_layer(m: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.conv import _ConvNd

    norms = (_NormBase, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
    return isinstance(m, (nn.Linear, _ConvNd, *norms))


def _shape(m: nn.Module) -> list[int] | None:
    w = getattr(m, "weight", None)
    return list(w.shape) if isinstance(w, Tensor) else None


def _layer_flops(model: nn.Module, inputs: Tensor, dynamic: bool) -> dict[str, float]:
    """Each module's FLOPs on one input (by fqn); the mean over ``inputs`` (each alone) for a dynamic model."""
    from ..flops import module_flops

    xs = inputs if dynamic else inputs[:1]
    total: dict[str, float] = {}
    for i in range(len(xs)):
        for name, f in module_flops(model, xs[i : i + 1]).items():
            total[name] = total.get(name, 0.0) + f / len(xs)
    return total


def analyse(path: str, *, input_shape: tuple[int, int, int] | None = None, flops_inputs: int = 16) -> dict[str, Any]:
    """Load ``path`` (converted or gated, from its metadata) and describe it; returns the JSON-ready analysis."""
    from ..errors import ConfigError
    from ..gate_ops import named_gates
    from ..gates import InputDependentGate
    from ..report import input_dimension
    from .modelfile import (
        build_dense,
        check_runs,
        count_params,
        count_weights,
        is_dynamic,
        load_model_file,
        model_dtype,
        random_inputs,
        resolve_input_shape,
    )

    f = load_model_file(path)
    model = f.model
    try:
        shape, source = resolve_input_shape([f], input_shape)
    except ConfigError:  # no stored shape and no --input: everything but the FLOPs
        shape, source = None, None
    try:
        dense = build_dense(f.arch, f.path)
    except ConfigError as e:  # e.g. a transformers arch without transformers installed
        dense, dense_error = None, str(e)
    else:
        dense_error = None
    dynamic = is_dynamic(model)
    flops: dict[str, float] = {}
    dense_flops: dict[str, float] = {}
    x = None
    if shape is not None:
        x = random_inputs(shape, flops_inputs, seed=1).to(model_dtype(model))
        check_runs(f, x[:1], source)
        flops = _layer_flops(model, x, dynamic)
        if dense is not None:
            dense_flops = _layer_flops(dense, x[:1].to(model_dtype(dense)), False)
    dense_modules = dict(dense.named_modules()) if dense is not None else {}
    layers = []
    for fqn, m in model.named_modules():
        if not _is_layer(m):
            continue
        n = sum(p.numel() for p in m.parameters())
        w = getattr(m, "weight", None)
        nz = float((w != 0).float().mean()) if isinstance(w, Tensor) and w.numel() else None
        d = dense_modules.get(fqn)
        dn = sum(p.numel() for p in d.parameters()) if d is not None else None
        layers.append(
            {
                "name": fqn,
                "type": type(m).__name__,
                "shape": _shape(m),
                "params": n,
                "weight_nonzero": nz,
                "flops": flops.get(fqn) if flops else None,
                "dense_shape": _shape(d) if d is not None else None,
                "kept": n / dn if dn else None,
            }
        )
    mine = {row["name"] for row in layers}
    removed = [fqn for fqn, d in dense_modules.items() if _is_layer(d) and fqn not in mine]
    gates = []
    for fqn, g in named_gates(model):
        slot = model.get_submodule(fqn.rpartition(".")[0]) if "." in fqn else None
        dim = getattr(slot, "dimension", None)
        if dim is None and isinstance(g, InputDependentGate):
            dim = input_dimension(g)
        row = {"name": fqn, "type": type(g).__name__, "dimension": dim}
        if hasattr(g, "keep_mask"):
            row.update(kept=int(g.keep_mask().sum()), total=int(g.num_units))
        else:  # input-dependent: decided per input, with a run-time budget (None: learned thresholds)
            row.update(kept=None, total=int(g.num_units), keep=None if g.keep is None else float(g.keep))
        gates.append(row)
    params, nonzero = count_params(model)
    weights, nonzero_weights = count_weights(model)
    totals: dict[str, Any] = {
        "params": params,
        "nonzero_params": nonzero,
        "weights": weights,
        "nonzero_weights": nonzero_weights,
        "dense_params": count_params(dense)[0] if dense is not None else None,
        "flops": flops.get("") if flops else None,
        "dense_flops": dense_flops.get("") if dense_flops else None,
        "flops_inputs": (flops_inputs if dynamic else 1) if flops else None,
    }
    if f.kind == "gated" and x is not None:
        from ..report import sparsity_report

        # the same inputs as the FLOPs above: one for a static model, the mean over all of them for a model that
        # decides per input (x[:1] alone disagreed with `analyse` of the converted file)
        xs = x if dynamic else x[:1]
        kept = [sparsity_report(model, xs[i : i + 1]).kept_flops for i in range(len(xs))]
        totals["converted_flops_estimate"] = None if None in kept else sum(kept) / len(kept)
    return {
        "path": f.path,
        "kind": f.kind,
        "arch": f.arch,
        "data": f.data,
        "dynamic": dynamic,
        "input_shape": list(shape) if shape is not None else None,
        "input_source": source,
        "dense_error": dense_error,
        "layers": layers,
        "removed_layers": removed,
        "gates": gates,
        "totals": totals,
    }


def _pct(v: float | None) -> str:
    return f"{100 * v:.1f}%" if v is not None else "-"


def _budget(keep: float | None) -> str:
    """An input-dependent gate's run-time budget; None: a threshold gate on its learned thresholds."""
    return "learned thresholds" if keep is None else f"budget {keep:.0%}"


def _dims(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def format_analysis(a: dict[str, Any], top: int | None = None) -> str:
    """A plain-text report of an `analyse` result; ``top`` keeps the ``top`` layers with most FLOPs (or params)."""
    from .modelfile import si

    arch = a["arch"]
    kwargs = json.dumps(arch["kwargs"]) if arch.get("kwargs") else ""
    head = f"{a['path']}: {a['kind']} model, {arch.get('library', 'timm')} {arch['name']} {kwargs}"
    lines = [head.rstrip()]
    d = a["data"] or {}
    if "distill" in d or "tokenizer" in d:  # a text encoder (convert.metadata.TEXT_DATA_FIELDS)
        lines.append(
            f"data: text, distilled on {', '.join(d.get('distill') or ['?'])}, tokenizer {d.get('tokenizer', '?')}, "
            f"up to {d.get('max_length', '?')} tokens"
        )
    elif d:
        lines.append(
            f"data: {d.get('dataset', '?')}, input {_dims(d.get('input_shape'))}, "
            f"normalised with mean {d.get('mean') or '-'} std {d.get('std') or '-'}"
        )
    text = "distill" in d or "tokenizer" in d
    if a["input_shape"] is None and text:
        lines.append("FLOPs: not counted for a text encoder here (token inputs); the run's report.json has them")
    elif a["input_shape"] is None:
        lines.append("FLOPs: no input shape stored in the file; pass --input C,H,W")
    else:
        per = " (mean over distinct random inputs: the model decides per input)" if a["dynamic"] else ""
        lines.append(f"FLOPs per input of shape {_dims(a['input_shape'])} ({a['input_source']}){per}")
    if a["dense_error"]:
        lines.append(f"no dense comparison: {a['dense_error']}")
    rows = a["layers"]
    key = "flops" if a["input_shape"] is not None else "params"
    if top is not None and top < len(rows):
        rows = sorted(rows, key=lambda r: r[key] or 0, reverse=True)[:top]
        lines.append(f"the {top} of {len(a['layers'])} layers with the most {'FLOPs' if key == 'flops' else 'params'}")
    w = max([len("layer"), *(len(r["name"]) for r in rows)])
    t = max([len("type"), *(len(r["type"]) for r in rows)])
    s = max([len("shape"), *(len(_dims(r["shape"])) for r in rows)])
    ds_ = max([len("dense shape"), *(len(_dims(r["dense_shape"])) for r in rows)])
    lines += [
        "",
        f"{'layer':<{w}}  {'type':<{t}}  {'shape':<{s}}  {'dense shape':<{ds_}}  {'kept':>6}  {'params':>10}  "
        f"{'weight nonzero':>14}  {'FLOPs':>8}",
    ]
    for r in rows:
        flops = si(r["flops"]) if r["flops"] is not None else "-"
        lines.append(
            f"{r['name']:<{w}}  {r['type']:<{t}}  {_dims(r['shape']):<{s}}  {_dims(r['dense_shape']):<{ds_}}  "
            f"{_pct(r['kept']):>6}  {r['params']:>10,}  {_pct(r['weight_nonzero']):>14}  {flops:>8}"
        )
    if a["removed_layers"]:
        names = ", ".join(a["removed_layers"][:4]) + (", ..." if len(a["removed_layers"]) > 4 else "")
        lines.append(f"removed (in the dense architecture only): {len(a['removed_layers'])} layers: {names}")
    if a["gates"]:
        g = max(len(r["name"]) for r in a["gates"])
        lines += ["", f"{'gate':<{g}}  {'dimension':<9}  {'class':<22}  kept / total"]
        for r in a["gates"]:
            kept = f"{r['kept']} / {r['total']}" if r["kept"] is not None else f"per input, {_budget(r['keep'])}"
            lines.append(f"{r['name']:<{g}}  {r['dimension'] or '-':<9}  {r['type']:<22}  {kept}")
    tot = a["totals"]
    lines.append("")
    params = f"parameters: {tot['params']:,}"
    if tot["dense_params"]:
        params += f" of {tot['dense_params']:,} dense ({_pct(tot['params'] / tot['dense_params'])})"
    lines.append(
        params + f", non-zero {tot['nonzero_params']:,} ({_pct(tot['nonzero_params'] / max(tot['params'], 1))})"
    )
    if tot.get("weights"):
        lines.append(
            f"Linear / Conv2d weights: {tot['weights']:,}, non-zero {tot['nonzero_weights']:,} "
            f"({_pct(tot['nonzero_weights'] / tot['weights'])})"
        )
    if tot["flops"] is not None:
        flops = f"FLOPs / input: {si(tot['flops'])}"
        if tot["dense_flops"]:
            flops += f" of {si(tot['dense_flops'])} dense ({_pct(tot['flops'] / tot['dense_flops'])})"
        lines.append(flops)
    if tot.get("converted_flops_estimate") is not None and tot["dense_flops"]:
        est = tot["converted_flops_estimate"]
        how = "the gates' keep masks"
        if a["dynamic"]:
            how += ", input-dependent gates deciding on the same inputs"
        lines.append(
            f"after `dynsparse convert`: {si(est)} FLOPs / input ({_pct(est / tot['dense_flops'])} of dense, "
            f"estimate from {how})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .modelfile import check_output_file, write_json

    check_output_file(args.json, "--json", inputs=[args.model])

    result = analyse(args.model, input_shape=args.input, flops_inputs=args.flops_inputs)
    print(format_analysis(result, top=args.top))
    write_json(args.json, result)
    return 0

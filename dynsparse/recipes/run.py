"""Run a recipe end to end: train the stages, an optional dense baseline, convert, evaluate, report, plot."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..convert import convert, save
from ..flops import mean_flops
from .gated_file import save_gated_checked
from .schema import Recipe, StageSpec
from .train import Trainer, build_model

__all__ = ["FLOPS_IMAGES", "data_spec", "dense_baseline", "run_recipe"]

#: Test images whose FLOPs (each counted alone) the report averages.
FLOPS_IMAGES = 32

log = logging.getLogger(__name__)


def dense_baseline(recipe: Recipe) -> Recipe:
    """The same recipe without any sparsity: same stages, epochs and optimizers (the same training budget)."""
    stages = tuple(
        StageSpec(name=s.name, epochs=s.epochs, optimizer=s.optimizer, schedule=s.schedule) for s in recipe.stages
    )
    return dataclasses.replace(recipe, stages=stages, baseline=False, name=recipe.name + "-dense")


def data_spec(recipe: Recipe, test_set: Any) -> dict[str, Any]:
    """The ``data`` metadata of the run's model files: data set, image size, channels, input shape, normalisation.

    ``image_size`` / ``channels`` are the recipe's (None: the data set's native ones); ``input_shape`` is the
    ``(C, H, W)`` of one test image as the model saw it, ``mean`` / ``std`` what the data pipeline normalised with
    (per channel, in ``[0, 1]`` pixel units; empty when it does not normalise).
    """
    d = recipe.data
    return {
        "dataset": d.dataset,
        "image_size": d.image_size,
        "channels": d.channels,
        "input_shape": [int(s) for s in test_set[0][0].shape],
        "mean": [float(m) for m in getattr(test_set, "mean", ())],
        "std": [float(s) for s in getattr(test_set, "std", ())],
    }


def _params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters (or non-zero ones) without the static gates' own; a run-time (input-dependent) gate's count."""
    from ..report import count_params

    return count_params(model)[1 if nonzero else 0]


def run_recipe(
    recipe: Recipe, out_dir: str | os.PathLike | None = None, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any] | None:
    """Train, convert, evaluate; writes ``report.json``, ``report.png``, ``model.safetensors`` to the output dir.

    Training and the accuracy evaluations run on ``recipe.device``; conversion, its output check, the saved
    model, FLOPs and latency run on the CPU (the latency claims are CPU claims), after the model moved there.

    Under ``torchrun`` every rank trains the sparse run and then the baseline (a distributed run of its own);
    rank 0 alone converts, evaluates and writes the report.

    Returns the report (on rank 0; ``None`` on other ranks of a distributed run).
    """
    out = Path(out_dir or recipe.output_dir).expanduser()  # a leading ~ in the recipe is the home directory
    trainer = Trainer(recipe, out, resume=resume, progress=progress)
    model = trainer.run()
    baseline = None
    if recipe.baseline:  # on every rank: its trainer wraps the model in DDP again, whose collectives need them all
        base = Trainer(dense_baseline(recipe), out / "baseline", resume=resume, progress=progress)
        base.run()
        baseline = {"test_acc": base.state.history[-1]["test_acc"], "history": base.state.history}
    if trainer.dist.world > 1 and not trainer.dist.main:
        return None
    test_loader = trainer._loader(0, train=False)
    x_verify = torch.stack([trainer.test_set[i][0] for i in range(min(8, len(trainer.test_set)))])
    model.eval()
    gated_acc = trainer._evaluate(model, test_loader)  # on the training device
    model = model.cpu()  # convert, verify, save, FLOPs and latency: on the CPU
    from ..prune import remove_

    if any(hasattr(m, "weight_mask") and not callable(m.weight_mask) for m in model.modules()):
        model = remove_(copy.deepcopy(model))  # unstructured masks become zeros in plain layers
    arch = {"library": recipe.model.library, "name": recipe.model.name, "kwargs": recipe.model.kwargs}
    data = data_spec(recipe, trainer.test_set)
    written = {}

    def difference(loaded: nn.Module) -> float:
        return float((loaded(x_verify) - model(x_verify)).abs().max())

    if save_gated_checked(model, out / "gated.safetensors", difference, arch=arch, data=data):  # `dynsparse convert`
        written["gated"] = "gated.safetensors"
    if recipe.convert.enabled:  # also without gates: the model file is then the (pruned) dense model
        converted = convert(
            model,
            verify_inputs=x_verify,
            atol=recipe.convert.atol,
            rtol=recipe.convert.atol,
            static=recipe.convert.static,
        )
        written["model"] = save(converted, out / "model.safetensors", arch=arch, data=data).name
    else:
        converted = model
    on_device = copy.deepcopy(converted).to(trainer.device) if trainer.device.type != "cpu" else converted
    conv_acc = trainer._evaluate(on_device, test_loader)
    del on_device
    dense = build_model(recipe).eval()
    ex = trainer.example
    # distinct test images: per-input models (routers, thresholds, per-input channels / neurons) spend different
    # FLOPs on each, and the inputs of a timed batch make their own decisions
    sizes = recipe.evaluate.batch_sizes if recipe.evaluate.latency else []
    images = _test_images(test_loader, max([FLOPS_IMAGES, *sizes]), ex.cpu())
    from .train import state_digest

    report: dict[str, Any] = {
        "recipe": recipe.name,
        "final_state_digest": state_digest(model),
        "stages": _stage_summary(trainer.state.history),
        "gated_test_acc": gated_acc,
        "converted_test_acc": conv_acc,
        "dense_baseline_test_acc": baseline["test_acc"] if baseline else None,
        "params": {
            "dense": _params(dense),
            "converted": _params(converted),
            "converted_nonzero": _params(converted, nonzero=True),
        },
        "flops": {
            "dense": mean_flops(dense, images[:FLOPS_IMAGES]),
            "converted": mean_flops(converted, images[:FLOPS_IMAGES]),
            "images": FLOPS_IMAGES,
        },
        "latency": [],
        "files": {**written, "report": "report.json", "plot": "report.png"},
    }
    if recipe.evaluate.latency:
        from ..bench.latency import compare_latency

        for b in recipe.evaluate.batch_sizes:
            x = images[:b].contiguous()
            res = compare_latency(
                {"dense": dense, "converted": converted},
                x,
                rounds=recipe.evaluate.rounds,
                threads=recipe.evaluate.threads,
            )
            report["latency"].append(
                {
                    "batch": b,
                    "threads": res.threads,
                    "rounds": res.rounds,
                    "dense_ms": 1e3 * res.median_s["dense"],
                    "converted_ms": 1e3 * res.median_s["converted"],
                    "speedup": res.speedup["converted"],
                }
            )
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(text))
    _plot(trainer.state.history, baseline, out / "report.png", recipe.name)
    print(format_report(report))
    return report


def _stage_summary(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last record of each stage, in stage order; stages that share a name are kept apart (by index)."""
    out: dict[Any, dict[str, Any]] = {}
    for r in history:
        out[r.get("stage_index", r["stage"])] = {k: v for k, v in r.items() if k not in ("time_s",)}
    return list(out.values())


def format_report(r: dict[str, Any]) -> str:
    """A plain-text table of a report."""
    lines = [f"recipe {r['recipe']}", "", "stage            epochs  test acc  kept FLOPs  weight sparsity"]
    for s in r["stages"]:
        kf = f"{100 * s['kept_flops']:.1f}%" if "kept_flops" in s else "-"
        ws = f"{100 * s['weight_sparsity']:.1f}%" if "weight_sparsity" in s else "-"
        lines.append(f"{s['stage']:<16} {s['epoch']:>6}  {100 * s['test_acc']:7.2f}%  {kf:>10}  {ws:>15}")
    lines.append("")
    lines.append(f"{'':<22}{'dense':>14}{'converted':>14}")
    if r["dense_baseline_test_acc"] is not None:
        lines.append(
            f"{'test accuracy':<22}{100 * r['dense_baseline_test_acc']:13.2f}%{100 * r['converted_test_acc']:13.2f}%"
        )
    else:
        lines.append(f"{'test accuracy':<22}{'-':>14}{100 * r['converted_test_acc']:13.2f}%")
    p = r["params"]
    lines.append(f"{'parameters':<22}{p['dense']:>14,}{p['converted']:>14,}")
    if p["converted_nonzero"] != p["converted"]:
        lines.append(f"{'non-zero parameters':<22}{p['dense']:>14,}{p['converted_nonzero']:>14,}")
    f = r["flops"]
    lines.append(
        f"{'FLOPs / image':<22}{f['dense']:>14,.0f}{f['converted']:>14,.0f}"
        f"   (mean of {f.get('images', 1)} test images)"
    )
    for lat in r["latency"]:
        lines.append(
            f"{'latency b=' + str(lat['batch']) + ' (ms)':<22}{lat['dense_ms']:14.3f}"
            f"{lat['converted_ms']:14.3f}   x{lat['speedup']:.2f} ({lat['threads']} thread, "
            f"median of {lat['rounds']} interleaved rounds)"
        )
    if r.get("files"):
        lines.append("")
        lines.append("wrote " + ", ".join(r["files"].values()))
    return "\n".join(lines)


def _test_images(loader, n: int, example: torch.Tensor) -> torch.Tensor:
    """The first ``n`` images of ``loader`` (cycled when it has fewer), on ``example``'s device and dtype."""
    chunks, have = [], 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        chunks.append(x)
        have += len(x)
        if have >= n:
            break
    if not chunks:
        return example.expand(n, *example.shape[1:])
    x = torch.cat(chunks)
    if len(x) < n:
        x = x.repeat((n + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))
    return x[:n].to(device=example.device, dtype=example.dtype)


def _plot(history: list[dict[str, Any]], baseline: dict[str, Any] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [100 * r["test_acc"] for r in history], "o-", color="C0", label="test accuracy (gated)")
    if baseline:
        ax.plot(
            [r["step"] for r in baseline["history"]],
            [100 * r["test_acc"] for r in baseline["history"]],
            "s--",
            color="C2",
            label="test accuracy (dense, same budget)",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    if any("kept_flops" in r for r in history):
        ax2.plot(steps, [100 * r.get("kept_flops", 1.0) for r in history], "^-", color="C1", label="kept FLOPs")
    if any("weight_sparsity" in r for r in history):
        ax2.plot(
            steps,
            [100 * (1 - r.get("weight_sparsity", 0.0)) for r in history],
            "v-",
            color="C3",
            label="non-zero weights",
        )
    ax2.set_ylabel("kept (%)")
    ax2.set_ylim(0, 105)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left", fontsize=8)
    last = None
    for r in history:
        key = r.get("stage_index", r["stage"])
        if key != last and last is not None:
            ax.axvline(r["step"] - 0.5, color="grey", lw=0.5)
        last = key
    ax.set_title(title)
    fig.tight_layout()
    try:  # atomically, like report.json: the format is given, the temporary file's name has no .png
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)

"""Run a ``task: sentence-embedding`` recipe: gates to a FLOPs target by distillation, convert, fine-tune, evaluate.

1. Teacher: the dense encoder (`EncoderSpec`), frozen. Student: a copy with hard-concrete gates (``sparsify``).
2. Gate stage, ``steps`` steps: distillation loss (`text_distill.distillation_loss`) + the FLOPs Lagrangian
   (`TargetSparsity` over the library's `CostModel`), AdamW on weights and gates, Adam
   (maximize) on the multipliers; then `enforce_target_` (kept FLOPs <= target).
3. ``fix_gates_``, ``convert`` (checked against the gated model on a padded batch), the `SlicePlan` to
   ``plan.json``; fine-tune stage, ``finetune_steps`` steps of the same distillation on the converted model.
4. ``model.safetensors`` (`dynsparse.save`), evaluation (held-out cosine, linear probe, FLOPs, CPU latency:
   `text_eval.evaluate_text`), ``report.json`` and the printed report.

The text is prepared by `text_data.prepare_text_data`; checkpoint helpers are in `text_checkpoint`.

Checkpoints (atomic, CPU tensors only, read with ``weights_only``): ``gates.pt`` and ``finetune.pt`` at the end of
each stage and, with ``checkpoint_every: N``, every N steps within it. Each holds the model, optimizer and
multiplier states, the step, the torch RNG states and the position in the batch stream, so ``resume=True``
continues from the last one written to the same result as a run never stopped (on the same device; bit for bit on
the CPU). Without ``checkpoint_every`` a killed run resumes from the last stage boundary. A checkpoint written by a
recipe that differs in a field the stage depends on is refused (`text_checkpoint.GATE_FIELDS` / ``FINETUNE_FIELDS``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..gate_ops import fix_gates_, named_gates
from ..gates import HardConcreteGate, SigmoidGate
from ..modules import module_device
from ..regularizers.budget import TargetSparsity
from ..regularizers.variational import VariationalGate
from ..sparsify import sparsify_
from .checkpoint import save_checkpoint, to_cpu, trim_log
from .device import resolve_device
from .gated_file import save_gated_checked
from .loader import recipe_to_dict
from .text_checkpoint import FINETUNE_FIELDS, GATE_FIELDS, fingerprint, load_stage, rng_state, set_rng_state
from .text_data import BatchStream, collate, prepare_text_data
from .text_distill import distillation_loss, expand, hidden_states, no_dropout_, width_keep
from .text_encoder import check_lengths, load_encoder, text_data_spec
from .text_schema import TextRecipe, sparsify_spec

__all__ = [
    "check_lengths",
    "enforce_target_",
    "finetune_steps_",
    "gate_optimizers",
    "gate_steps_",
    "load_encoder",
    "make_budget",
    "run_text_recipe",
    "text_data_spec",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ building blocks
def make_budget(student: nn.Module, target: float, warmup_steps: int, example: tuple[Tensor, Tensor]) -> TargetSparsity:
    """`TargetSparsity` on the kept FLOPs of a gated BERT (on the CPU).

    Its `CostModel` scales each module's FLOPs by every gate that removes some of them; the attention kernel not by
    the width gate. Its terms equal those of the attribution the recorded MiniLM runs used
    (``benchmarks/_minilm.py::attribute_bert_flops_``; ``tests/test_minilm_compress.py``).
    """
    return TargetSparsity(student, target=target, kind="flops", warmup_steps=warmup_steps, example_input=example)


def gate_optimizers(
    student: nn.Module,
    budget: TargetSparsity,
    *,
    lr: float,
    gate_lr: float,
    lambda_lr: float,
    weight_decay: float = 0.01,
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW (weights at ``lr`` with decay, the gates' parameters (``log_alpha``, ``logits``) at ``gate_lr`` without)
    and Adam(maximize) of the multipliers at ``lambda_lr``."""
    of_gates = {id(p) for _, g in named_gates(student) for p in g.parameters()}
    gates = [p for n, p in student.named_parameters() if n.endswith("log_alpha") or id(p) in of_gates]
    weights = [p for n, p in student.named_parameters() if not (n.endswith("log_alpha") or id(p) in of_gates)]
    opt = torch.optim.AdamW(
        [
            {"params": weights, "lr": lr, "weight_decay": weight_decay},
            {"params": gates, "lr": gate_lr, "weight_decay": 0.0},
        ]
    )
    return opt, torch.optim.Adam(budget.parameters(), lr=lambda_lr, maximize=True)


def gate_steps_(
    teacher: nn.Module,
    student: nn.Module,
    budget: TargetSparsity,
    opt: torch.optim.Optimizer,
    opt_lambda: torch.optim.Optimizer,
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    w_tok: float,
    w_layer: float = 0.0,
    start: int = 0,
    log_every: int = 25,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> float | None:
    """Gate-stage steps ``start .. steps - 1``: distillation + the FLOPs Lagrangian (trains ``student`` in place).

    Every model, the budget and the optimizers are already on the training device; ``on_step(done, loss)`` is
    called after each step (``done``: steps finished; ``loss``: a detached tensor, read it only when needed).
    Returns the last step's distillation loss.
    """
    no_dropout_(student.train())
    hc = [g for _, g in named_gates(student) if hasattr(g, "constrain_")]
    dev = module_device(student)
    d = None
    for step in range(start, steps):
        ids, mask = (t.to(dev) for t in next(data))  # once per step, for the teacher and the student
        d = distillation_loss(teacher, student, ids, mask, keep=None, w_tok=w_tok, w_layer=w_layer)
        reg = budget(step)
        (d + reg).backward()
        opt.step()
        opt_lambda.step()
        opt.zero_grad(set_to_none=True)
        opt_lambda.zero_grad(set_to_none=True)
        for g in hc:
            g.constrain_()
        if step % log_every == 0 or step == steps - 1:
            log.info(
                "gates step %4d/%d: distill %.4f  expected FLOPs %.3f (target now %.3f, deterministic %.3f)  "
                "lambda1 %+.3f lambda2 %+.3f",
                step,
                steps,
                d.item(),
                budget.expected().item(),
                budget.target_at(step),
                budget.cost.fraction(),
                budget.lambda1.item(),
                budget.lambda2.item(),
            )
        if on_step is not None:  # the loss as a tensor: a callback reads it (a device sync) only when it logs
            on_step(step + 1, d.detach())
    return None if d is None else d.item()


@torch.no_grad()
def enforce_target_(budget: TargetSparsity, refill: bool = False) -> float:
    """``budget.enforce_(reopen=True)``: close by probability, then reopen what fits, most likely first.

    ``refill``: then also reopen, fully and most likely first (by ``expected_keep``), units closed during training
    while the target holds (when the multipliers pushed the kept FLOPs below the target): the units of every gate
    with a ``log_alpha`` or ``logits`` parameter (see `_opener`); a unit the value does not open stays closed.
    Returns the kept fraction.
    """
    budget.enforce_(reopen=True)
    if refill:  # the controller overshot during training: reopen units it closed (fully) while the target holds
        shut = []
        for _, slot in budget.cost.slots:
            g, opener = slot.gate, _opener(slot.gate)
            if opener is None:
                continue
            keep, mask = g.expected_keep(), g.keep_mask()
            shut += [(float(keep[j]), *opener, j, g) for j in range(g.num_units) if not mask[j]]
        for _, p, open_value, j, g in sorted(shut, key=lambda c: -c[0]):
            old = float(p[j])
            p[j] = open_value
            if not bool(g.keep_mask()[j]) or budget.cost.fraction() > budget.target + 1e-9:
                p[j] = old
    return budget.cost.fraction()


def _opener(gate: nn.Module) -> tuple[Tensor, float] | None:
    """The parameter whose entry ``j`` decides whether unit ``j`` of ``gate`` is kept, and a value that opens it fully
    (the counterpart of `dynsparse.regularizers.budget._closer`).

    Hard-concrete: the top of ``log_alpha_range``, at least where the eval gate is 1; variational (dropped where
    ``log α`` > threshold): the bottom of ``log_alpha_range``, at most ``threshold - 1``; sigmoid: a logit whose soft
    value is far above the threshold; another gate with ``log_alpha`` or ``logits``: 20. ``None`` for a gate with
    neither parameter (fixed, top-k): nothing to reopen.
    """
    if isinstance(gate, VariationalGate):
        return gate.log_alpha, min(gate.threshold - 1.0, gate.log_alpha_range[0])
    if isinstance(gate, SigmoidGate):
        return gate.logits, gate.temperature * (math.log(gate.threshold / (1.0 - gate.threshold)) + 20.0)
    if isinstance(gate, HardConcreteGate):  # eval clamp(sigmoid(a) (zeta - gamma) + gamma, 0, 1) is 1 from here on
        one = math.log((1.0 - gate.gamma) / (gate.zeta - 1.0))
        return gate.log_alpha, max(gate.log_alpha_range[1], one + 1.0)
    p = getattr(gate, "log_alpha", None)
    if p is None:
        p = getattr(gate, "logits", None)
    return None if p is None else (p, 20.0)


def finetune_steps_(
    teacher: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    keep: Tensor | None,
    w_tok: float,
    w_layer: float = 0.0,
    start: int = 0,
    log_every: int = 25,
    name: str = "finetune",
    on_step: Callable[[int, Tensor], None] | None = None,
) -> float | None:
    """Distillation fine-tune steps ``start .. steps - 1`` of a converted (plain) model, in place.

    ``keep``: the model's residual channels among the teacher's (None: all). Returns the last loss.
    """
    no_dropout_(model.train())
    dev = module_device(model)
    loss = None
    for step in range(start, steps):
        ids, mask = (t.to(dev) for t in next(data))  # once per step, for the teacher and the model
        loss = distillation_loss(teacher, model, ids, mask, keep=keep, w_tok=w_tok, w_layer=w_layer)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            log.info("%s fine-tune step %4d/%d: distill %.4f", name, step, steps, loss.item())
        if on_step is not None:
            on_step(step + 1, loss.detach())
    return None if loss is None else loss.item()


def _progress(total: int, start: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------- run
def _stage_state(
    stage: str, step: int, done: bool, loss: float | None, parts: dict[str, Any], stream: Any, device: Any
) -> dict[str, Any]:
    """A stage checkpoint: position, the ``parts``' state dicts on the CPU, the data stream and the RNG state."""
    return {
        "stage": stage,
        "step": step,
        "done": done,
        "loss": loss,
        **{name: to_cpu(part.state_dict()) for name, part in parts.items()},
        "stream": stream.state_dict(),
        "rng": rng_state(device),
    }


def _restore(ck: dict[str, Any], parts: dict[str, Any], stream: Any, device: Any) -> tuple[int, float | None]:
    """Load a `_stage_state` checkpoint into ``parts``, the stream and the RNG; returns (step, loss)."""
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    stream.load_state_dict(ck["stream"])
    set_rng_state(ck["rng"], device)
    return int(ck["step"]), ck["loss"]


def run_text_recipe(
    recipe: TextRecipe, out_dir: str | os.PathLike | None = None, *, resume: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Train, convert, fine-tune and evaluate a sentence-embedding recipe; returns the report.

    Writes to the output dir (default ``recipe.output_dir``): ``gates.pt`` / ``finetune.pt`` (checkpoints),
    ``log.jsonl`` (a record every ``log_every`` steps), ``plan.json`` (the `SlicePlan`), ``model.safetensors``
    (the converted model, `dynsparse.save`; load it with `dynsparse.load`), ``report.json``; prints the report.

    Args:
        recipe: The recipe.
        out_dir: Output directory.
        resume: Continue from the last checkpoint in the output dir (a stage boundary, or with
            ``checkpoint_every`` the last step written); a checkpoint of a recipe that differs in a field that
            changes the training is refused.
        progress: Progress bars on stderr (default: when stderr is a terminal).

    Raises:
        RecipeError: the device is not available, the encoder is not a BERT, a checkpoint does not fit.
        DynsparseError: conversion does not reproduce the gated model.
    """
    from ..convert import convert, make_plan, save
    from .text_eval import evaluate_text, format_text_report, structure

    t0 = time.time()
    out = Path(out_dir or recipe.output_dir).expanduser()  # a leading ~ in the recipe is the home directory
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(recipe.device)
    progress = sys.stderr.isatty() if progress is None else progress
    torch.manual_seed(recipe.seed)
    teacher, tok = load_encoder(recipe.encoder)
    check_lengths(recipe, teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    width = teacher.config.hidden_size
    data = prepare_text_data(recipe, tok)
    log.info(
        "data: %d distillation sequences, %d held-out, probe %d / %d",
        len(data.train),
        len(data.held),
        len(data.probe_train),
        len(data.probe_test),
    )
    stream = BatchStream(data.train, recipe.data.batch_size, seed=recipe.seed)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    sparsify_(student, sparsify_spec(recipe))
    g_path, f_path, log_path = out / "gates.pt", out / "finetune.pt", out / "log.jsonl"
    ck_g = load_stage(g_path, recipe, GATE_FIELDS) if resume and g_path.exists() else None
    if resume and ck_g is None:
        log.info("resume: no checkpoint in %s; starting afresh", out)
    if ck_g is None:  # a fresh run: no stale log or checkpoint of an earlier one (resumed after an early kill)
        log_path.write_text("")
        g_path.unlink(missing_ok=True)
        f_path.unlink(missing_ok=True)

    def record(**kw: Any) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(kw) + "\n")

    # ---- gate stage
    opt_cfg, b = recipe.optimizer, recipe.budget
    budget = make_budget(student, b.target, int(b.warmup * recipe.steps), data.example)
    student.to(device)
    budget.to(device)
    teacher.to(device)
    opt, opt_lambda = gate_optimizers(
        student, budget, lr=opt_cfg.lr, gate_lr=opt_cfg.gate_lr, lambda_lr=b.lr, weight_decay=opt_cfg.weight_decay
    )
    start, gate_loss = 0, None
    gate_state = {"model": student, "budget": budget, "opt": opt, "opt_lambda": opt_lambda}
    if ck_g is not None:
        start, gate_loss = _restore(ck_g, gate_state, stream, device)
        trim_log(log_path, "gates", start)  # the steps after the checkpoint run (and log) again
        log.info("resumed the gate stage from %s at step %d%s", g_path, start, " (done)" if ck_g["done"] else "")

    def save_gates(step: int, loss: float | None, done: bool) -> None:
        state = _stage_state("gates", step, done, loss, gate_state, stream, device)
        save_checkpoint({**state, "recipe": fingerprint(recipe, GATE_FIELDS)}, g_path)

    if ck_g is None or not ck_g["done"]:
        bar = _progress(recipe.steps, start, "gates", progress)

        def on_gate_step(done: int, loss: Tensor) -> None:
            if bar is not None:
                bar.update(1)
            if (done - 1) % recipe.log_every == 0 or done == recipe.steps:
                with torch.no_grad():
                    expected = budget.expected().item()
                record(
                    stage="gates",
                    step=done,
                    loss=loss.item(),
                    expected_flops=expected,
                    target=budget.target_at(done - 1),
                    lambda1=budget.lambda1.item(),
                    lambda2=budget.lambda2.item(),
                )
            if recipe.checkpoint_every and done % recipe.checkpoint_every == 0 and done < recipe.steps:
                save_gates(done, loss.item(), done=False)

        gate_loss = gate_steps_(
            teacher,
            student,
            budget,
            opt,
            opt_lambda,
            stream,
            recipe.steps,
            w_tok=recipe.loss.w_tok,
            w_layer=recipe.loss.w_layer,
            start=start,
            log_every=recipe.log_every,
            on_step=on_gate_step,
        )
        if bar is not None:
            bar.close()
        student.eval().cpu()
        budget.cpu()
        enforce_target_(budget, refill=b.refill)
        save_gates(recipe.steps, gate_loss, done=True)
    else:
        student.eval().cpu()
        budget.cpu()
    kept_gates = budget.cost.fraction()
    log.info("gate stage done: kept FLOPs by the gates %.4f (target %.4f)", kept_gates, b.target)

    # ---- convert
    fix_gates_(student)
    keep = width_keep(student)
    plan = make_plan(student)
    atomic_write(out / "plan.json", lambda tmp: Path(tmp).write_text(plan.to_json()))
    small = convert(student)  # verify_inputs cannot compare a narrower stream; checked here instead
    vids, vmask = collate(data.held[:8])
    vmask[0, 5:] = 0  # padding in the check batch
    with torch.no_grad():
        diff = (expand(hidden_states(small, vids, vmask), keep, width) - hidden_states(student, vids, vmask)).abs()
    diff = float(diff.max())
    log.info(
        "converted: max-abs difference to the gated model %.2e; width %d", diff, width if keep is None else len(keep)
    )
    if not diff < 1e-3:
        from ..errors import DynsparseError

        raise DynsparseError(f"the converted model differs from the gated one by {diff:.2e} (max-abs, >= 1e-3)")
    data_meta = text_data_spec(recipe)
    written = {"plan": "plan.json"}

    # the gate stage's result with its gates frozen, for `dynsparse analyse` and `ds.load_gated` (converting it gives
    # the converted model before the fine-tune stage)
    def difference(loaded: nn.Module) -> float:
        return float((hidden_states(loaded, vids, vmask) - hidden_states(student, vids, vmask)).abs().max())

    if save_gated_checked(student, out / "gated.safetensors", difference, data=data_meta):
        written["gated"] = "gated.safetensors"

    # ---- fine-tune stage
    small.to(device)
    opt_f = torch.optim.AdamW(
        [p for p in small.parameters() if p.requires_grad],
        lr=opt_cfg.finetune_lr or opt_cfg.lr,
        weight_decay=opt_cfg.weight_decay,
    )
    resumable = ck_g is not None and ck_g["done"] and f_path.exists()
    ck_f = load_stage(f_path, recipe, FINETUNE_FIELDS) if resumable else None
    start_f, ft_loss = 0, None
    ft_state = {"model": small, "opt": opt_f}
    if ck_f is not None:
        start_f, ft_loss = _restore(ck_f, ft_state, stream, device)
        log.info("resumed the fine-tune stage from %s at step %d", f_path, start_f)
    trim_log(log_path, "finetune", start_f)  # a resumed run: what was logged after the last checkpoint

    def save_finetune(step: int, loss: float | None, done: bool) -> None:
        state = _stage_state("finetune", step, done, loss, ft_state, stream, device)
        save_checkpoint({**state, "recipe": fingerprint(recipe, FINETUNE_FIELDS)}, f_path)

    if ck_f is None or not ck_f["done"]:
        bar = _progress(recipe.finetune_steps, start_f, "finetune", progress)

        def on_ft_step(done: int, loss: Tensor) -> None:
            if bar is not None:
                bar.update(1)
            if (done - 1) % recipe.log_every == 0 or done == recipe.finetune_steps:
                record(stage="finetune", step=done, loss=loss.item())
            if recipe.checkpoint_every and done % recipe.checkpoint_every == 0 and done < recipe.finetune_steps:
                save_finetune(done, loss.item(), done=False)

        ft_loss = finetune_steps_(
            teacher,
            small,
            opt_f,
            stream,
            recipe.finetune_steps,
            keep=keep,
            w_tok=recipe.loss.w_tok,
            w_layer=recipe.loss.w_layer,
            start=start_f,
            log_every=recipe.log_every,
            on_step=on_ft_step,
        )
        if bar is not None:
            bar.close()
        save_finetune(recipe.finetune_steps, ft_loss, done=True)
    small.eval().cpu()
    written["model"] = save(small, out / "model.safetensors", data=data_meta).name
    t_train = time.time() - t0

    # ---- evaluation (embeddings on the training device; FLOPs and latency on the CPU)
    ev = evaluate_text(recipe, data, teacher, small, keep, width, device)
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "task": "sentence-embedding",
        "encoder": recipe.encoder.pretrained or recipe.encoder.path,
        "device": str(device),
        "target": b.target,
        "stages": [
            {"stage": "gates", "steps": recipe.steps, "loss": gate_loss, "kept_flops": kept_gates},
            {"stage": "finetune", "steps": recipe.finetune_steps, "loss": ft_loss, "kept_flops": None},
        ],
        "convert_max_abs_diff": diff,
        "params": ev["params"],
        "flops": {**ev["flops"], "kept_by_gates": kept_gates},
        "evaluate": ev["evaluate"],
        "width": width if keep is None else len(keep),
        "dense_width": width,
        "structure": structure(small),
        "latency": ev["latency"],
        "train_seconds": t_train,
        "recipe_fields": recipe_to_dict(recipe),
        "files": {**written, "report": "report.json"},
    }
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(format_text_report(report))
    return report

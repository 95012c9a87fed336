"""The recipe trainer: plain PyTorch, runs unchanged under ``torchrun`` (DistributedDataParallel: gloo on CPU,
nccl with one GPU per rank on CUDA).

Per stage: structural changes at the start (gates, sparse-VD layers, frozen gates) and the start
calibrations, epochs of training with the stage's regularizers, a JSON-lines log record and an atomic
checkpoint after every epoch, then the stage's end actions (enforce a budget, prune VD weights, the end
calibrations). A stage of 0 epochs applies its start and end actions and is evaluated and checkpointed once.
``resume=True`` rebuilds the structure from the recipe, loads the last checkpoint (weights, optimizer states,
RNG state) and continues to the same result.

The recipe's ``device`` holds the model, teacher, gates, regularizer states and batches; checkpoints hold CPU
tensors only, so a run trained on a GPU resumes on a CPU and the other way round.

The trainer's parts live next to it: the optimizers and learning-rate schedule in `dynsparse.recipes.optimizers`,
the regularizer and distillation terms in `dynsparse.recipes.objective`, the logged numbers and `state_digest` in
`dynsparse.recipes.metrics`, what a checkpoint holds in `dynsparse.recipes.train_checkpoint`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..gate_ops import fix_gates_, named_gates
from ..gates import HardConcreteGate
from ..prune.unstructured import reapply_masks_
from ..sparsify import sparsify_
from .calibrate import calibrate_, harden_thresholds_, replay_
from .checkpoint import load_checkpoint, save_checkpoint, to_cpu, write_log
from .device import resolve_device
from .metrics import eval_accuracy, mean_over_ranks, sparsity_record, state_digest
from .objective import distill_loss, regularizer_loss
from .optimizers import lr_factor, stage_optimizers
from .pruning import StagePruning
from .regularize import _has_svd, build_regularizers
from .schema import Recipe, RecipeError, RegularizerSpec, StageSpec, naming_field
from .train_checkpoint import RunState, check_resume, checkpoint_state, restore_

__all__ = ["Trainer", "build_model"]

log = logging.getLogger(__name__)


def build_model(recipe: Recipe) -> nn.Module:
    """The recipe's (dense) model: random weights, or the ``model.pretrained`` weights an installed package ships."""
    from ..convert.io import build_host

    if recipe.model.pretrained is not None:
        from ..pretrained import load_pretrained

        return load_pretrained(recipe.model.pretrained, **recipe.model.kwargs)
    return build_host(
        {"library": recipe.model.library, "name": recipe.model.name, "kwargs": recipe.model.kwargs},
        source="recipe model",
    )


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class Trainer:
    """Runs a recipe's stages.

    Args:
        recipe: The recipe.
        out_dir: Output directory (default: ``recipe.output_dir``).
        resume: Continue from ``out_dir/checkpoint.pt``.
        progress: Show progress bars (rank 0, on a terminal).
    """

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | os.PathLike | None = None,
        *,
        resume: bool = False,
        progress: bool | None = None,
    ) -> None:
        self.recipe = recipe
        self.out = Path(out_dir or recipe.output_dir).expanduser()  # a leading ~ is the home directory
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.dist = _Dist()
        self.device = torch.device("cpu")  # resolved from recipe.device by run()
        self.model: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.state = RunState()
        self.pruning: StagePruning | None = None
        self._calib_info: dict[str, float] = {}  # numbers of the last calibration, for the next log record

    # ----------------------------------------------------------------------------------------- set-up
    def _init_dist(self) -> None:
        """The device (``cuda:LOCAL_RANK`` per rank under torchrun) and the process group (nccl on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None
        self.device = resolve_device(self.recipe.device, local_rank=local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if torch.distributed.is_initialized():
            self.dist = _Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())

    def _data(self) -> None:
        from ..data import load_dataset

        d = self.recipe.data
        kw = dict(root=d.root, image_size=d.image_size, channels=d.channels)
        self.train_set = load_dataset(d.dataset, split="train", **kw)
        self.test_set = load_dataset(d.dataset, split="test", **kw)
        if d.train_subset is not None:
            g = torch.Generator().manual_seed(self.recipe.seed)
            idx = torch.randperm(len(self.train_set), generator=g)[: d.train_subset].tolist()
            self.train_set = torch.utils.data.Subset(self.train_set, idx)
        self.example = self.test_set[0][0][None]

    def _loader(self, stage_idx: int, train: bool, sharded: bool = True):
        """The test loader, or a stage's training loader: this rank's shard, or (``sharded=False``) every batch in
        the order a one-process run trains on (what pruning scores, identically on every rank)."""
        from ..data import make_loader

        d = self.recipe.data
        pin = self.device.type == "cuda"
        if train:
            return make_loader(
                self.train_set,
                d.batch_size,
                shuffle=True,
                seed=self.recipe.seed + 1009 * stage_idx,
                distributed=self.dist.world > 1 and sharded,
                drop_last=True,
                pin_memory=pin,
            )
        return make_loader(self.test_set, d.eval_batch_size, shuffle=False, seed=0, pin_memory=pin)

    def _check_steps(self) -> None:
        """A training stage needs at least one optimizer step per epoch (``drop_last``: a full batch per rank)."""
        if any(st.epochs > 0 for st in self.recipe.stages) and len(self._loader(0, train=True)) == 0:
            d, ranks = self.recipe.data, f" per rank ({self.dist.world} ranks)" if self.dist.world > 1 else ""
            n = len(self.train_set) // self.dist.world
            raise RecipeError(
                f"data.batch_size: {d.batch_size} is more than the {n} training images{ranks} (data.train_subset: "
                f"{d.train_subset}), so an epoch would have no optimizer step; lower data.batch_size or train on more "
                "images"
            )

    def _check_model(self) -> None:
        """The model takes the data's images and gives one logit per class (one eval forward, before training).

        Raises:
            RecipeError: naming ``model`` and ``data``: the forward fails (channels, image size), or the number of
                logits is not the data set's number of classes.
        """
        d, model, classes = self.recipe.data, self.model, len(self.test_set.classes)
        shape = tuple(self.example.shape[1:])
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(self.example.to(self.device))
        except (RuntimeError, AssertionError, ValueError) as e:  # torch's shape errors, timm's input-size asserts
            raise RecipeError(
                f"model: cannot run on a {shape} image of data.dataset {d.dataset!r} (data.image_size: "
                f"{d.image_size}, data.channels: {d.channels}; check model.kwargs such as in_chans and img_size): "
                f"{type(e).__name__}: {e}"
            ) from e
        finally:
            model.train(was)
        if not isinstance(out, torch.Tensor) or out.shape != (1, classes):
            got = f"{out.shape[-1]} logits" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise RecipeError(
                f"model: {self.recipe.model.name!r} gives {got} per image, but data.dataset {d.dataset!r} has "
                f"{classes} classes; set model.kwargs.num_classes: {classes}"
            )

    def _batches(self, loader):
        """``(x, y)`` batches of ``loader`` on the run's device."""
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # ---------------------------------------------------------------------------------- structure
    def _start_stage_(self, si: int, st: StageSpec) -> None:
        from ..regularizers.variational import sparse_vd_

        model = self.model
        if st.distill is not None:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        else:
            self.teacher = None
        if st.sparsify:
            with naming_field(f"stages[{si}].sparsify"):  # a spec this model cannot take fails only here
                sparsify_(model, st.sparsify)
        if any(r.name == "sparse_vd" for r in st.regularizers) and not _has_svd(model):
            with naming_field(f"stages[{si}].regularizers"):
                sparse_vd_(model)
        if st.fix_gates:
            fix_gates_(model)
            harden_thresholds_(model)

    def _pruning(self, si: int, st: StageSpec) -> StagePruning | None:
        if st.prune is None:
            return None
        return StagePruning(
            self.model,
            st.prune,
            epochs=st.epochs,
            steps_per_epoch=len(self._loader(si, train=True)),
            data=lambda: self._batches(self._loader(si, train=True, sharded=False)),  # the same batches on every rank
            example=self.example.to(self.device),
            where=f"stages[{si}].prune",
            seed=self.recipe.seed + 1009 * si,
        )

    def _end_stage_structure_(self, st: StageSpec) -> None:
        if st.prune_vd and _has_svd(self.model):
            from ..regularizers.variational import remove_svd_

            remove_svd_(self.model)

    def _calibrate(self, si: int, st: StageSpec, when: str) -> None:
        """The stage's calibrations due ``when`` on training batches in a seeded order of their own (the same on
        every rank and on a resumed run, independent of the training order), on the run's device."""
        if st.calibrate is None:
            return
        from ..data import make_loader, set_epoch

        def batches():
            loader = make_loader(
                self.train_set, self.recipe.data.batch_size, shuffle=True, seed=self.recipe.seed + 7919 + 1009 * si
            )
            set_epoch(loader, 0 if when == "start" else 1)
            for x, _ in self._batches(loader):
                yield x

        with naming_field(f"stages[{si}].calibrate"):
            self._calib_info.update(calibrate_(self.model, st.calibrate, when, batches, seed=self.recipe.seed))

    def _rebuild(self, ckpt: dict[str, Any]) -> None:
        """Replay the structural changes of the stages before the checkpoint's stage, then load its state."""
        meta = ckpt["meta"]
        self.state = RunState(meta["stage"], meta["epoch"], meta["step"], json.loads(meta["history"]))
        for i, st in enumerate(self.recipe.stages[: self.state.stage + 1]):
            self._start_stage_(i, st)
            ended = i < self.state.stage or self.state.epoch >= st.epochs
            self.pruning = self._pruning(i, st)
            if self.pruning is not None:
                self.pruning.structure_(ended=ended)  # masks and fixed gates come with the state loaded below
            if st.calibrate is not None:  # thresholds, tables, predictors come with the state; budgets do not
                replay_(self.model, st.calibrate, "start")
            if ended:
                self._end_stage_structure_(st)
                if st.calibrate is not None:
                    replay_(self.model, st.calibrate, "end")
        restore_(self.model, self.teacher, ckpt, self.device)

    # ----------------------------------------------------------------------------------- training
    def _regularizers(self, si: int, st: StageSpec, steps_per_epoch: int) -> list[tuple[RegularizerSpec, Any]]:
        return build_regularizers(self.model, st, steps_per_epoch, self.example.to(self.device), f"stages[{si}]")

    def _evaluate(self, model: nn.Module, loader) -> float:
        """Test accuracy of ``model`` over ``loader``, on the model's device."""
        return eval_accuracy(model, loader, len(self.test_set.classes))

    def run(self) -> nn.Module:
        """Train every stage; returns the trained (gated) model."""
        torch.manual_seed(self.recipe.seed)
        self._init_dist()
        self._data()
        self._check_steps()
        self.model = build_model(self.recipe).to(self.device)  # initialised on the CPU: the same weights anywhere
        self._check_model()
        ck_path = self.out / "checkpoint.pt"
        resumed_stage = None
        if self.resume and ck_path.exists():
            ckpt = load_checkpoint(ck_path)
            check_resume(ckpt, self.recipe, ck_path)
            self._rebuild(ckpt)
            resumed_stage = self.state.stage
            if self.dist.main:  # the log as the checkpoint recorded it: the epochs after it run (and log) again
                write_log(self.out / "log.jsonl", self.state.history)
            log.info("resumed from %s at stage %d epoch %d", ck_path, self.state.stage, self.state.epoch)
        elif self.dist.main:
            if self.resume:  # asked to resume, but nothing to resume from: say so rather than start afresh silently
                log.warning("--resume: no checkpoint at %s; starting afresh", ck_path)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "log.jsonl").write_text("")
        test_loader = self._loader(0, train=False)
        n_train = len(self.train_set)
        for si in range(self.state.stage, len(self.recipe.stages)):
            st = self.recipe.stages[si]
            resumed = si == resumed_stage
            if resumed and self.state.epoch >= st.epochs:
                continue  # the checkpoint's stage had finished (its end may have changed the parameters)
            if not resumed:
                self.state.stage, self.state.epoch = si, 0
                self._start_stage_(si, st)
                self.pruning = self._pruning(si, st)
                if self.pruning is not None:
                    self.pruning.start_()
                self._calibrate(si, st, "start")
            self._train_stage(si, st, test_loader, n_train, ck_path, resume_opt=resumed)
        if self.dist.world > 1:
            (self.out / f"rank{self.dist.rank}.json").write_text(json.dumps({"digest": state_digest(self.model)}))
            torch.distributed.barrier()
        return self.model

    def _train_stage(self, si: int, st: StageSpec, test_loader, n_train: int, ck_path: Path, resume_opt: bool) -> None:
        model = self.model
        loader = self._loader(si, train=True)
        steps_per_epoch = len(loader)
        regs = self._regularizers(si, st, steps_per_epoch)
        opts = stage_optimizers(model, st, regs)
        budget = next((o for r, o in regs if r.name == "budget"), None)
        # base learning rates come from the spec, before a resumed optimizer state overwrites the scheduled ones
        base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in opts.items() if k != "lambdas"}
        ckpt = load_checkpoint(ck_path) if resume_opt and ck_path.exists() else None
        if ckpt is not None and ckpt["meta"]["stage"] == si:
            for k, o in opts.items():
                o.load_state_dict(ckpt["optim"][k])
            if budget is not None and ckpt.get("budget") is not None:
                budget.load_state_dict(ckpt["budget"])
        net = model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            from ..gates.neuron_gates import DejaVuGate

            # dejavu predictors take no part in the loss (their top-k has no gradient; calibrate trains them)
            unused = any(isinstance(m, DejaVuGate) for m in model.modules())
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
        total_steps = st.epochs * steps_per_epoch
        bn_l1 = next((o for r, o in regs if r.name == "bn_l1"), None)
        # the gates are fixed within a stage (structure changes only at its start and end): find them once
        hc_gates = [g for _, g in named_gates(model) if isinstance(g, HardConcreteGate)]
        for epoch in range(self.state.epoch, st.epochs):
            from ..data import set_epoch

            set_epoch(loader, epoch)
            model.train()
            t0, loss_sum, n = time.perf_counter(), 0.0, 0
            it = loader
            if self.progress and self.dist.main:
                from tqdm import tqdm

                it = tqdm(loader, desc=f"{st.name} {epoch + 1}/{st.epochs}", leave=False)
            info: dict[str, float] = {}
            for bi, (x, y) in enumerate(it):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                step_in_stage = epoch * steps_per_epoch + bi
                f = lr_factor(st.schedule, step_in_stage, total_steps, steps_per_epoch)
                for k, lrs in base_lrs.items():
                    for g, lr in zip(opts[k].param_groups, lrs, strict=True):
                        g["lr"] = lr * f
                out = net(x)
                loss = F.cross_entropy(out, y)
                if self.teacher is not None:
                    with torch.no_grad():
                        t_out = self.teacher(x)
                    loss = loss + st.distill.weight * distill_loss(out, t_out, st.distill.temperature)
                reg, info = regularizer_loss(
                    model, regs, epoch + bi / steps_per_epoch, step_in_stage, n_train, self.device
                )
                total = loss + reg
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
                total.backward()
                if bn_l1 is not None:
                    bn_l1.add_subgradient_()
                for o in opts.values():
                    o.step()
                reapply_masks_(model)  # momentum / Adam state moves masked raw weights: keep them at 0
                for r, obj in regs:
                    if r.name == "group_lasso" and r.prox:
                        obj.prox_step_(opts["weights"].param_groups[0]["lr"])
                for g in hc_gates:
                    g.constrain_()
                if self.pruning is not None:
                    self.pruning.step(step_in_stage)
                loss_sum += float(loss.detach()) * len(y)
                n += len(y)
                self.state.step += 1
            self._sync_buffers()
            self.state.epoch = epoch + 1
            if epoch + 1 == st.epochs:
                self._end_stage_(si, st, budget)
            train_loss = mean_over_ranks(loss_sum, n, self.dist.world, self.device)
            self._close_epoch(si, st, test_loader, opts, budget, ck_path, train_loss, t0, info)
        if st.epochs == 0 and not resume_opt:  # nothing to train: the end actions, one record and a checkpoint
            self._end_stage_(si, st, budget)
            self._close_epoch(si, st, test_loader, opts, budget, ck_path, None, time.perf_counter(), {})

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (what its checkpoint holds) after an epoch of a distributed run.

        DDP broadcasts rank 0's buffers at the start of each forward, then every rank updates its own from its shard
        (BatchNorm running statistics): after the last step they differ, and so would the evaluation, the end-of-stage
        pruning and calibration, the next stage's teacher and the final model of each rank.
        """
        if self.dist.world > 1:
            for b in self.model.buffers():
                t = b if b.is_contiguous() else b.contiguous()
                torch.distributed.broadcast(t, src=0)
                if t is not b:
                    b.copy_(t)

    def _end_stage_(self, si: int, st: StageSpec, budget) -> None:
        """The stage's end actions, in order: enforce the budget, end-of-stage pruning, structure, calibration."""
        if st.enforce_budget and budget is not None:
            budget.enforce_()
        if self.pruning is not None:
            self.pruning.end_()
        self._end_stage_structure_(st)
        self._calibrate(si, st, "end")

    def _close_epoch(
        self,
        si: int,
        st: StageSpec,
        test_loader,
        opts,
        budget,
        ck_path: Path,
        train_loss: float | None,
        t0: float,
        info,
    ) -> None:
        """Evaluate, write the checkpoint, then append the log record (rank 0; the checkpoint first, so a kill between
        the two never logs an epoch that a resumed run repeats)."""
        model = self.model
        acc = self._evaluate(model, test_loader)
        record = {
            "stage": st.name,
            "stage_index": si,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "train_loss": train_loss,
            "test_acc": acc,
            "time_s": time.perf_counter() - t0,
            **info,
            **self._calib_info,
        }
        self._calib_info = {}
        record.update(sparsity_record(model, budget, self.recipe, self.example, self.device))
        self.state.history.append(record)
        if self.dist.main:
            self._save(ck_path, opts, budget)
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            log.info("%s epoch %d/%d: loss %s acc %.4f", st.name, self.state.epoch, st.epochs, train_loss, acc)
        if self.dist.world > 1:
            torch.distributed.barrier()

    def _save(self, path: Path, opts: dict[str, torch.optim.Optimizer], budget) -> None:
        """Write the checkpoint: CPU tensors only, whatever the run's device (it resumes on any device)."""
        state = checkpoint_state(self.model, self.teacher, opts, budget, self.state, self.recipe, self.device)
        save_checkpoint(to_cpu(state), path)

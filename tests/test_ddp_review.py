"""Two gloo ranks train one tiny recipe with hard-concrete gates and a target-sparsity budget, gradual (AGP) Taylor
pruning and CATS calibration: after every epoch both ranks hold the same parameters and buffers, the same optimizer
and Lagrange-multiplier states, and report the accuracy over the whole test set."""

from __future__ import annotations

import hashlib
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RECIPE = """\
name: ddp-review
seed: 3
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 16, train_subset: 64}
stages:
  - name: gates
    epochs: 1
    sparsify: {heads: {gate: hard_concrete}, layers: {gate: hard_concrete}}
    regularizers: [{name: budget, target: 0.6, kind: flops, warmup_epochs: 0.5, lr: 0.05}]
    optimizer: {name: adamw, lr: 0.003}
    gate_optimizer: {name: adam, lr: 0.05}
    enforce_budget: true
  - name: agp
    epochs: 1
    fix_gates: true
    optimizer: {name: adamw, lr: 0.001}
    prune: {method: unstructured, importance: taylor, ratio: 0.5, schedule: agp, begin_epoch: 0, end_epoch: 1,
            frequency: 1, calibration_batches: 1}
  - name: cats
    epochs: 1
    sparsify: {neurons: {gate: cats, keep: 0.5}}
    calibrate: {batches: 2, at: both}
    optimizer: {name: adamw, lr: 0.001}
evaluate: {latency: false}
convert: {enabled: false}
"""


def _digest(obj) -> str:
    """sha256 of the tensors and plain values of nested dicts / lists (optimizer and budget states)."""
    h = hashlib.sha256()

    def add(o, path: str) -> None:
        if isinstance(o, torch.Tensor):
            h.update(path.encode())
            h.update(o.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                add(o[k], f"{path}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                add(v, f"{path}[{i}]")
        else:
            h.update(f"{path}={o!r}".encode())

    add(obj, "")
    return h.hexdigest()


def _rank(rank: int, world: int, port: int, recipe_path: str, out: str, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from dynsparse.data import make_loader, set_epoch
    from dynsparse.recipes.loader import load_recipe
    from dynsparse.recipes.metrics import eval_accuracy, state_digest
    from dynsparse.recipes.train import Trainer

    records = []

    class Recording(Trainer):
        def _close_epoch(self, si, st, test_loader, opts, budget, ck_path, *args) -> None:
            super()._close_epoch(si, st, test_loader, opts, budget, ck_path, *args)
            records.append(
                {
                    "stage": st.name,
                    "model": state_digest(self.model),
                    "optim": {k: _digest(o.state_dict()) for k, o in opts.items()},
                    "budget": _digest(budget.state_dict()) if budget is not None else None,
                    "test_acc": self.state.history[-1]["test_acc"],
                }
            )

    try:
        trainer = Recording(load_recipe(recipe_path), out, progress=False)
        model = trainer.run()
        loader = trainer._loader(0, train=True)  # this rank's shard of two epochs
        shards = []
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            shards.append(sorted(i for i in loader.sampler))
        # the whole test set, as a one-process run evaluates it
        full = make_loader(trainer.test_set, 64, shuffle=False)
        acc = eval_accuracy(model, full, len(trainer.test_set.classes))
        queue.put((rank, {"records": records, "shards": shards, "acc": acc}))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="gloo over localhost TCP")
def test_two_ranks_stay_identical_through_gates_budget_pruning_and_calibration(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(recipe), str(tmp_path / "out"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    r0, r1 = got[0], got[1]
    assert [r["stage"] for r in r0["records"]] == ["gates", "agp", "cats"]
    for a, b in zip(r0["records"], r1["records"], strict=True):
        assert a == b, (a, b)  # weights, gates, masks, thresholds, optimizer and multiplier states
    assert r0["records"][0]["budget"] is not None and "lambdas" in r0["records"][0]["optim"]
    # the logged accuracy is over the whole test set (not a rank's shard)
    assert r0["records"][-1]["test_acc"] == pytest.approx(r0["acc"], abs=0)
    # each epoch: disjoint shards of equal size, another order in the next epoch
    for epoch in (0, 1):
        a, b = set(r0["shards"][epoch]), set(r1["shards"][epoch])
        assert not a & b and len(a) == len(b) == 32
    assert r0["shards"][0] != r0["shards"][1]

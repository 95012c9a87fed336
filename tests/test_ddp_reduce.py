"""What the trainer reduces across ranks: the logged training loss is the mean over every rank's samples."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynsparse.recipes.metrics import mean_over_ranks


def _rank(rank: int, world: int, init: str, queue) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        # rank 0: 3 samples of loss 1; rank 1: 1 sample of loss 5 -> (3 + 5) / 4 = 2 on both ranks
        total, count = (3.0, 3) if rank == 0 else (5.0, 1)
        queue.put((rank, mean_over_ranks(total, count, world, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_train_loss_is_the_mean_over_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == {0: 2.0, 1: 2.0}


def test_one_process_reduces_nothing():
    assert mean_over_ranks(3.0, 4, 1, torch.device("cpu")) == 0.75
    assert mean_over_ranks(0.0, 0, 1, torch.device("cpu")) is None  # no step: no made-up loss of 0.0

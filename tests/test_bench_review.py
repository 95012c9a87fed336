"""Review findings in the measurement helpers and the benchmark scripts (no timings asserted)."""

from __future__ import annotations

import torch
from torch import nn

from dynsparse.bench import compare_latency


def test_compare_latency_restores_each_submodules_training_flag():
    # a model fine-tuned with frozen BatchNorm: restoring only the top-level flag (train(True)) unfroze the norm
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    m[1].eval()
    compare_latency({"m": m, "eval": nn.Linear(4, 4).eval()}, torch.zeros(2, 4), rounds=1, warmup=0)
    assert m.training and m[0].training and not m[1].training, "the frozen BatchNorm must stay in eval mode"

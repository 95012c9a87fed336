"""Helpers shared by the unstructured pruning and schedule tests: two small dense models and exact counts."""

from __future__ import annotations

import math

import torch
from torch import nn

from dynsparse import prune


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


def cnn(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).to(dtype)


def count(fraction, n):
    return math.floor(fraction * n + 0.5)


def n_pruned(model):
    return sum(int((~m).sum()) for m in prune.masks(model).values())


def n_weights(model):
    return sum(m.numel() for m in prune.masks(model).values())

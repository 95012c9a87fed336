"""Helpers shared by the real-data benchmark scripts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dynsparse.data import set_epoch


def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (batches ``(x, y)``), in eval mode; the training flag is restored."""
    was = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    model.train(was)
    return correct / total


def train_adam_cosine(
    model: nn.Module, loader, epochs: int, lr: float, seed: int = 0, after_step: Callable[[], None] | None = None
) -> None:
    """Adam with a cosine decay to 0.1·lr, cross-entropy; the data order depends on ``seed`` and the epoch only.

    ``after_step`` runs after every optimizer step (e.g. to re-apply pruning masks).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps, step = max(1, epochs * len(loader)), 0
    model.train()
    for epoch in range(epochs):
        set_epoch(loader, epoch + 1000 * seed)
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item()))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if after_step is not None:
                after_step()

"""Helpers shared by the real-data benchmark scripts."""

from __future__ import annotations

import torch
from torch import nn


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

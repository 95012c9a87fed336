"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no arbitrary unpickle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write
from ..errors import DynsparseError

__all__ = ["load_checkpoint", "save_checkpoint", "to_cpu"]


def to_cpu(obj: Any) -> Any:
    """``obj`` (a state dict, or nested dicts and lists of tensors) with every tensor detached on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state dict's versions (load_state_dict reads them)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (tensors and plain data only) to ``path`` atomically: temp file, fsync, rename."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; errors name the file."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DynsparseError(f"{path}: no checkpoint to resume from") from None
    except Exception as e:  # a damaged file or one with objects that weights_only refuses
        raise DynsparseError(f"{path}: cannot read the checkpoint ({e})") from None

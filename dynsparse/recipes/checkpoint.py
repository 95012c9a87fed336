"""Training checkpoints: written atomically, read with ``torch.load(weights_only=True)`` (no arbitrary unpickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_write
from ..errors import DynsparseError

__all__ = ["load_checkpoint", "save_checkpoint", "to_cpu", "trim_log", "write_log"]


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


def write_log(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Write ``records`` as a JSON-lines log, atomically (a resumed run's log: what its checkpoint recorded)."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def trim_log(path: str | os.PathLike, stage: str, step: int) -> None:
    """Drop the records of ``stage`` past ``step`` from the JSON-lines log at ``path`` (when there is one).

    A resumed run repeats the steps after its last checkpoint; the records they logged before the kill go, so the
    log holds each step once.
    """
    path = Path(path)
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r.get("stage") != stage or r.get("step", 0) <= step]
    if len(kept) != len(records):
        write_log(path, kept)

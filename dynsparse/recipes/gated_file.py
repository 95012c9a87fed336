"""The ``gated.safetensors`` a run writes beside its converted model: the trained gated model, checked by loading
it back (used by the image and the text runners)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_gated_checked"]

log = logging.getLogger(__name__)


def save_gated_checked(
    model: nn.Module,
    path: Path,
    difference: Callable[[nn.Module], float],
    *,
    arch: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    atol: float = 1e-5,
) -> bool:
    """``save_gated`` of ``model`` to ``path``, then load it back and require ``difference(loaded) <= atol``.

    ``difference(loaded)`` is the max-abs difference between the loaded model's outputs and ``model``'s on the
    run's check inputs. The file is an extra of a finished run, so nothing here may end the run: where the model
    has no gates, `save_gated` refuses it, or the file does not rebuild the model, the reason is logged, no file is
    left (a stale one from an earlier run in the same directory included) and False is returned.
    """
    from ..convert.io import HISTORY_ATTR, load_gated, save_gated

    if not getattr(model, HISTORY_ATTR, None):
        log.info("no gates (the model was not sparsified): no %s written", path.name)
        path.unlink(missing_ok=True)
        return False
    try:
        save_gated(model, path, arch=arch, data=data)
        loaded = load_gated(path)[0].eval()
        with torch.no_grad():
            diff = float(difference(loaded))
        if not diff <= atol:
            raise ValueError(f"the checkpoint loads back with different outputs (max-abs difference {diff:.2e})")
    except Exception as e:
        log.warning("%s not written: %s: %s", path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return False
    return True

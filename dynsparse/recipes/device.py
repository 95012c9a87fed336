"""The device a recipe trains on: ``device: auto | cpu | cuda | cuda:N``, checked against this machine.

The recipe's ``device`` (default ``cpu``, so that recorded runs reproduce) is only spelled out in the recipe;
`resolve_device` turns it into a ``torch.device`` when the trainer starts, so a recipe written for a GPU still
loads (and can be analysed) on a machine without one, and fails with an error naming the field when trained there.
"""

from __future__ import annotations

import logging
import re

import torch

from .schema import RecipeError

__all__ = ["check_device", "resolve_device"]

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def check_device(spec: str, where: str = "device") -> None:
    """Raise `RecipeError` naming ``where`` unless ``spec`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    m = _DEVICE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise RecipeError(f"{where}: {spec!r} is not a device; use auto, cpu, cuda or cuda:N (N: a GPU index)")


def resolve_device(spec: str, *, local_rank: int | None = None, where: str = "device") -> torch.device:
    """The ``torch.device`` a recipe's ``device`` names on this machine.

    Args:
        spec: ``auto`` (the GPU when CUDA is available, else the CPU), ``cpu``, ``cuda`` (GPU 0, or the current
            one) or ``cuda:N``.
        local_rank: Under ``torchrun``: this process's ``LOCAL_RANK``; a CUDA run then uses ``cuda:LOCAL_RANK``
            (one GPU per rank) whatever index the spec names.
        where: The field's name in errors.

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", index)`` (always with an index, for DDP's ``device_ids``).

    Raises:
        RecipeError: ``spec`` is not a device, asks for CUDA where ``torch.cuda.is_available()`` is false, or names
            a GPU index this machine does not have.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    check_device(spec, where)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RecipeError(
            f"{where}: {spec!r} asks for CUDA, but torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}, {built}); use device: cpu, or auto to take a GPU only where there is one"
        )
    count = torch.cuda.device_count()
    asked = _DEVICE.fullmatch(spec).group(2)
    if local_rank is not None:
        if asked is not None and int(asked) != local_rank:
            log.warning("%s: %r under torchrun: rank uses cuda:%d (its LOCAL_RANK)", where, spec, local_rank)
        index = local_rank
    else:
        index = int(asked) if asked is not None else torch.cuda.current_device()
    if index >= count:
        raise RecipeError(
            f"{where}: {spec!r} needs GPU index {index}, but this machine has {count} CUDA device(s) "
            f"(indices 0..{count - 1})"
        )
    return torch.device("cuda", index)

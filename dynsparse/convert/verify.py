"""``verify``: run two models on the same inputs and check their outputs agree."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import DynsparseError

__all__ = ["verify"]


def _flatten(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return []


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Tensor | tuple,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    width: tuple[int, Sequence[int]] | None = None,
) -> float:
    """Max-abs difference of ``candidate``'s outputs to ``reference``'s, both in eval mode, on ``inputs``.

    Training flags are restored afterwards.

    Args:
        reference: The reference model (e.g. the gated model).
        candidate: The model to check (e.g. the converted model).
        inputs: One input tensor or a tuple of positional inputs.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        width: ``(full, keep)`` when the candidate's residual stream was pruned (the ``width`` dimension): a
            reference output whose last axis has ``full`` entries, against a candidate output with ``len(keep)``,
            is compared on the kept channels ``keep`` (a narrower model returns only those).

    Raises:
        DynsparseError: some element differs by more than ``atol + rtol * |reference|`` (the message gives
            the max-abs difference), or the output structures differ.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    flags = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        with torch.no_grad():
            ref, out = _flatten(reference(*args)), _flatten(candidate(*args))
    finally:
        reference.train(flags[0])
        candidate.train(flags[1])
    if width is not None and len(ref) == len(out):
        full, keep = width
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        ref = [
            a.index_select(-1, idx.to(a.device))
            if a.dim() and a.shape[-1] == full and b.shape[-1] == len(idx) and a.shape[:-1] == b.shape[:-1]
            else a
            for a, b in zip(ref, out, strict=True)
        ]
    if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out, strict=True)):
        raise DynsparseError("verify: the two models return outputs of different structure or shape")
    diff, bad = 0.0, False
    for a, b in zip(ref, out, strict=True):
        d = (a.double() - b.double()).abs()
        diff = max(diff, float(d.max()) if d.numel() else 0.0)
        bad = bad or bool((d > atol + rtol * a.double().abs()).any())
    if bad:
        raise DynsparseError(f"verify: outputs differ, max-abs difference {diff:.3g} (atol={atol}, rtol={rtol})")
    return diff

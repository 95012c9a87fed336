"""``verify``: run two models on the same inputs and check their outputs agree."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DynsparseError
from ..modules import inputs_to_device_of

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

    Training flags are restored afterwards. The inputs go to each model's device (its first floating parameter
    or buffer; a model without one gets them as they are), and each output is compared on the device of the
    reference's, so a GPU model can be checked on CPU inputs, or against a CPU reference.

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
        ConfigError: ``atol`` or ``rtol`` is negative, NaN or infinite.
        DynsparseError: some element differs by more than ``atol + rtol * |reference|`` (the message gives
            the max-abs difference), one model gives NaN or inf where the other does not give the same value
            (the difference is then reported as nan), the output structures differ, or the reference's output
            holds no tensor.
    """
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(tol, int | float) and math.isfinite(tol) and tol >= 0):  # a NaN tolerance passed anything
            raise ConfigError(f"verify: {name} must be a finite number >= 0, got {tol!r}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    flags = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        with torch.no_grad():
            raw = reference(*inputs_to_device_of(reference, args))
            out = _flatten(candidate(*inputs_to_device_of(candidate, args)))
    finally:
        reference.train(flags[0])
        candidate.train(flags[1])
    ref = _flatten(raw)
    if not ref:  # nothing compared is no agreement
        raise DynsparseError(
            f"verify: the reference's output ({type(raw).__name__}) holds no tensor to compare (verify reads "
            "tensors, and lists, tuples and dicts of them)"
        )
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
    diff, bad = 0.0, []
    for i, (a, b) in enumerate(zip(ref, out, strict=True)):
        d, problem = _compare(a.double(), b.double().to(a.device), atol, rtol)
        diff = d if math.isnan(d) or d > diff else diff  # NaN wins, as builtin max() would drop it
        if problem:
            bad.append(f"output {i}: {problem}")
    if bad:
        raise DynsparseError(
            f"verify: outputs differ, max-abs difference {diff:.3g} (atol={atol}, rtol={rtol}); {'; '.join(bad[:3])}"
        )
    return diff


def _compare(a: Tensor, b: Tensor, atol: float, rtol: float) -> tuple[float, str | None]:
    """Max-abs difference of ``b`` to the reference ``a``, and what is wrong with ``b`` (None when it is close).

    A non-finite value matches only the same value in the other tensor (NaN with NaN, +inf with +inf). Any other
    non-finite pair is a failure, and the difference is then NaN.
    """
    if not a.numel():
        return 0.0, None
    finite = torch.isfinite(a) & torch.isfinite(b)
    mismatch = ~finite & ~((a.isnan() & b.isnan()) | (a == b))
    if bool(mismatch.any()):
        return float("nan"), (
            f"{int(mismatch.sum())} element(s) are NaN or inf in one model but not the same in the other "
            f"(non-finite elements: reference {int((~torch.isfinite(a)).sum())}, "
            f"candidate {int((~torch.isfinite(b)).sum())})"
        )
    d = (a - b).abs()[finite]
    diff = float(d.max()) if d.numel() else 0.0
    if bool((d > atol + rtol * a[finite].abs()).any()):
        return diff, "values differ beyond the tolerance"
    return diff, None

"""Helpers shared by the importance scores: batches, scoring mode, the weights and the gates to score."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers.slot import GateSlot
from ..modules import modes_kept
from ..registry import suggest
from ..regularizers._common import UNIT_DIMENSIONS, SlotRef, gated_slots
from ..sparsify import DIMENSIONS, _patterns, _selected

__all__ = [
    "LossFn",
    "batch_loss",
    "batches",
    "check_dimensions",
    "double_backward_ok",
    "gate_layers",
    "gate_refs",
    "requiring_grad",
    "scoring_mode",
    "split_batch",
    "to_model",
    "used_weight",
    "weight_modules",
]

#: ``loss_fn(output, targets) -> scalar`` (``loss_fn(output)`` for batches without targets).
LossFn = Callable[..., Tensor]


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a tensor (no targets) or an ``(inputs, targets, ...)`` tuple / list."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ConfigError(f"a batch must be a tensor or an (inputs, targets) tuple, got {type(batch).__name__}")


def _device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def to_model(model: nn.Module, x: Any) -> Any:
    """``x`` moved to the device of ``model`` (tensors only; anything else is returned as it is)."""
    device = _device(model)
    return x.to(device) if isinstance(x, Tensor) and device is not None else x


def batch_loss(model: nn.Module, loss_fn: LossFn, batch: Any, temperature: float = 1.0) -> Tensor:
    """Scalar loss of ``model`` on one batch; the output is divided by ``temperature`` first (GraSP)."""
    x, y = split_batch(batch)
    out = model(to_model(model, x))
    if temperature != 1.0:
        out = out / temperature
    loss = loss_fn(out) if y is None else loss_fn(out, to_model(model, y))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}"
        )
    return loss.reshape(())


def batches(data: Iterable[Any], max_batches: int | None, owner: str) -> Iterator[Any]:
    """The batches of ``data`` (an iterable of batches), at most ``max_batches``; raises when there is none."""
    if isinstance(data, Tensor):
        raise ConfigError(
            f"{owner}: data must be an iterable of batches (e.g. a DataLoader), got one tensor; wrap it in a list"
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ConfigError(f"{owner}: max_batches must be an int >= 1 or None, got {max_batches!r}")
    n = 0
    for batch in data if max_batches is None else itertools.islice(data, max_batches):
        n += 1
        yield batch
    if n == 0:
        raise ConfigError(f"{owner}: data yielded no batch")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Run ``model`` in train or eval mode, then restore every module's flag and every buffer (BN statistics)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    with modes_kept(model):
        model.train(train)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)


def double_backward_ok() -> contextlib.AbstractContextManager[None]:
    """Restrict ``scaled_dot_product_attention`` to its math kernel, the one with a double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def requiring_grad(params: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily set ``requires_grad`` on ``params`` (frozen weights can be scored too)."""
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, old, strict=True):
            p.requires_grad_(flag)


def weight_modules(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    layers: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> dict[str, nn.Module]:
    """``{param_fqn: module}`` for the weight of every ``layers`` module (``isinstance``) selected by module fqn globs.

    A module (or weight) reached under two names is scored once, under its first name. The layers of gates (a
    per-input predictor, router or saliency network) are left out, as `dynsparse.prune.unstructured_` never
    prunes them.
    """
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    in_gates = gate_layers(model)
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for fqn, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, layers) or not isinstance(w, Tensor) or not _selected(fqn, inc, exc) or id(w) in seen:
            continue
        if id(m) in in_gates:
            continue
        seen.add(id(w))
        out[f"{fqn}.weight" if fqn else "weight"] = m
    if not out:
        names = ", ".join(c.__name__ for c in layers)
        raise ConfigError(f"no {names} weight of the model matches include={include!r}, exclude={exclude!r}")
    return out


def check_dimensions(owner: str, dimensions: Iterable[str], allowed: Sequence[str] = DIMENSIONS) -> tuple[str, ...]:
    """Validate dimension words against ``allowed``; returns them as a tuple."""
    dims = (dimensions,) if isinstance(dimensions, str) else tuple(dimensions)
    if not dims:
        raise ConfigError(f"{owner}: dimensions must name at least one of {', '.join(allowed)}")
    for d in dims:
        if d not in allowed:
            raise ConfigError(
                f"{owner}: dimension {d!r} is not supported.{suggest(str(d), allowed)} Known: {', '.join(allowed)}"
            )
    return dims


def gate_refs(model: nn.Module, dimensions: Sequence[str]) -> list[SlotRef]:
    """Every static gate slot of ``model`` of these dimensions: unit gates of gated layers, then branch gates.

    For a ``layers`` gate ``layer`` is the block holding the slot (not a `GatedLayer`).
    """
    refs = list(gated_slots(model, [d for d in dimensions if d in UNIT_DIMENSIONS]))
    if "layers" in dimensions:
        for fqn, m in model.named_modules():
            if isinstance(m, GateSlot) and m.dimension == "layers":
                from ..integrations.tables import slot_owner

                parent, child = slot_owner(model, fqn, "layers")
                refs.append(SlotRef(f"{fqn}.gate", parent, model.get_submodule(parent), child, m))
    return refs


def used_weight(module: nn.Module) -> Tensor:
    """The weight ``module``'s forward uses, detached: ``masked_weight()`` where it has one (a masked layer, whose
    raw ``weight`` an optimizer may have moved under the mask), else ``weight``."""
    masked = getattr(module, "masked_weight", None)
    with torch.no_grad():
        return (masked() if callable(masked) else module.weight).detach()


def gate_layers(model: nn.Module) -> set[int]:
    """``id`` of every module inside a gate of ``model``: a gate's own layers (a predictor, router or saliency
    network) decide, they are not the model, so they are never scored or pruned."""
    from ..gates import Gate, InputDependentGate

    return {id(m) for g in model.modules() if isinstance(g, (Gate, InputDependentGate)) for m in g.modules()}

"""Working with the gates of a gated model: `named_gates` (find them), `penalty` (their regularization terms as one
scalar) and `fix_gates_` (freeze them to fixed keep masks, for `dynsparse.convert`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .errors import ConfigError, GateError
from .gates import FixedGate, Gate, InputDependentGate
from .registry import suggest

__all__ = ["fix_gates_", "named_gates", "penalty"]


def named_gates(model: nn.Module) -> Iterator[tuple[str, Gate | InputDependentGate]]:
    """Every gate of ``model`` with its qualified name (e.g. ``"blocks.0.mlp.norm.gate"``)."""
    for fqn, m in model.named_modules():
        if isinstance(m, (Gate, InputDependentGate)):
            yield fqn, m


def penalty(model: nn.Module) -> Tensor:
    """Sum of every gate's ``penalty()`` as one scalar (0 when the model has no gate with a penalty).

    Summed in float32 at least (float16 terms of large models would overflow), on the device of the model's
    parameters (a gate without parameters or buffers gives its zero on the CPU).
    """
    terms = [g.penalty() for _, g in named_gates(model)]
    p = next(model.parameters(), None)
    if not terms:
        return torch.zeros((), device=p.device if p is not None else None)
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in terms], torch.float32)
    device = p.device if p is not None else terms[0].device
    return torch.stack([t.to(device=device, dtype=dtype) for t in terms]).sum()


def fix_gates_(model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> nn.Module:
    """Freeze gates to fixed bool masks (in place) and return ``model``.

    Args:
        model: A gated model.
        masks: ``{gate_fqn: keep_mask}``; a key may also name the gate's slot (without ``.gate``). ``None``
            freezes every static gate to its own current ``keep_mask()`` and eval values.

    Raises:
        ConfigError: an fqn names no gate (with close matches).
        GateError: a mask has the wrong shape or dtype (names the fqn).
    """
    gates = {fqn: g for fqn, g in named_gates(model) if isinstance(g, Gate)}
    if masks is None:
        items = [(fqn, None) for fqn in gates]
    else:
        items = []
        for key, mask in masks.items():
            fqn = key if key in gates else f"{key}.gate"
            if fqn not in gates:
                raise ConfigError(f"fix_gates_: {key!r} names no gate of the model.{suggest(key, list(gates))}")
            items.append((fqn, mask))
    for fqn, mask in items:
        old = gates[fqn]
        ref = old.eval_values().detach()
        if mask is None:
            values, mask_t = ref.clamp(min=0), old.keep_mask()
        else:
            mask_t = torch.as_tensor(mask, device=ref.device)
            if mask_t.dtype != torch.bool or mask_t.shape != (old.num_units,):
                raise GateError(
                    f"fix_gates_: mask for {fqn!r} must be bool of shape ({old.num_units},), "
                    f"got {mask_t.dtype} {tuple(mask_t.shape)}"
                )
            values = torch.ones_like(ref)
        new = FixedGate(old.num_units, mask=mask_t, values=values, device=ref.device, dtype=ref.dtype)
        new.train(old.training)
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model

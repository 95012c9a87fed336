"""Gates: modules over ``num_units`` units that decide which units are kept."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError, GateError
from ..registry import Registry
from .base import Gate, InputDependentGate
from .channel_gates import CHANNEL_GATES, FBSGate
from .fixed import FixedGate
from .hard_concrete import HardConcreteGate
from .head_gates import HEAD_GATES, DejaVuHeadGate
from .neuron_gates import NEURON_GATES, CatsGate, DejaVuGate, NeuronGate
from .routers import ROUTERS, BlockRouter
from .sigmoid import SigmoidGate
from .tokens import (
    TOKEN_GATES,
    ClsAttentionTokenGate,
    PredictorTokenGate,
    ThresholdTokenGate,
    TokenGate,
    make_token_gate,
    received_attention,
)
from .topk import TopKGate

__all__ = [
    "CHANNEL_GATES",
    "GATES",
    "HEAD_GATES",
    "NEURON_GATES",
    "ROUTERS",
    "TOKEN_GATES",
    "BlockRouter",
    "CatsGate",
    "ClsAttentionTokenGate",
    "DejaVuGate",
    "DejaVuHeadGate",
    "FBSGate",
    "FixedGate",
    "Gate",
    "GateSpec",
    "HardConcreteGate",
    "InputDependentGate",
    "NeuronGate",
    "PredictorTokenGate",
    "SigmoidGate",
    "ThresholdTokenGate",
    "TokenGate",
    "TopKGate",
    "make_gate",
    "make_token_gate",
    "received_attention",
    "register_gate",
]

GATES: Registry[Callable[..., Gate]] = Registry("gate")
GATES.register("hard_concrete")(HardConcreteGate)
GATES.register("sigmoid")(SigmoidGate)
GATES.register("topk")(TopKGate)
GATES.register("fixed")(FixedGate)

#: What a gated layer accepts as its gate: a registered name, ``{"gate": name, **kwargs}``, or a factory
#: ``f(num_units, device=..., dtype=...) -> Gate``.
GateSpec = str | Mapping[str, Any] | Callable[..., Gate]


def register_gate(name: str) -> Callable:
    """Decorator registering a ``Gate`` subclass (or factory) under ``name``; duplicates raise."""
    return GATES.register(name)


def make_gate(
    spec: GateSpec,
    num_units: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Gate:
    """Build a gate from a spec.

    Args:
        spec: A registered name (``"hard_concrete"``), a mapping ``{"gate": name, **gate_kwargs}``, or a factory.
        num_units: Number of units of the gate.
        device: Device of the gate's tensors.
        dtype: Dtype of the gate's floating tensors.
        **kwargs: Extra keyword arguments for the gate constructor.

    Returns:
        The gate, a ``Gate``.
    """
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "gate" not in spec:
            raise ConfigError(f"gate spec {spec!r} has no 'gate' field naming a registered gate ({GATES.names()})")
        name = spec.pop("gate")
        clash = sorted(set(spec) & (set(kwargs) | {"device", "dtype"}))
        if clash:
            raise ConfigError(f"gate spec for {name!r} sets {clash}, which the caller sets too")
        return make_gate(name, num_units, device=device, dtype=dtype, **spec, **kwargs)
    factory = GATES.get(spec) if isinstance(spec, str) else spec
    if not callable(factory):
        raise ConfigError(f"gate spec must be a name, a mapping or a callable, got {type(spec).__name__}")
    try:
        gate = factory(num_units, device=device, dtype=dtype, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad arguments for gate {spec!r}: {e}") from e
    if not isinstance(gate, Gate):
        if isinstance(gate, InputDependentGate):
            raise GateError(f"gate {spec!r} is input-dependent; static dimensions need a Gate")
        raise GateError(f"gate factory {spec!r} returned {type(gate).__name__}, not a Gate")
    return gate

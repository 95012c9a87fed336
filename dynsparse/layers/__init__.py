"""Drop-in gated layers for timm hosts.

``GateSlot`` and ``GatedLayer`` are host-agnostic; the gated timm classes import timm on first access,
so ``import dynsparse`` stays free of timm.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import GatedLayer, SlotSpec
from .slot import GateSlot

_LAZY = {
    "GatedMlp": ".mlp",
    "GatedGluMlp": ".mlp",
    "GatedSwiGLU": ".mlp",
    "GatedAttention": ".attention",
    "GatedBasicBlock": ".conv",
    "GatedBottleneck": ".conv",
    "GatedInvertedResidual": ".conv",
    "GatedEdgeResidual": ".conv",
    "GatedDepthwiseSeparableConv": ".conv",
    "Branch": ".residual",
    "PolicyBlock": ".tokens",
    "RoutedBlock": ".routing",
    "RoutedPolicyBlock": ".routing",
    "TokenGatedBlock": ".tokens",
    "TokenSelect": ".tokens",
    "gate_branches_": ".residual",
    "FBSBasicBlock": ".channel_gating",
    "FBSBottleneck": ".channel_gating",
    "gate_channels_": ".channel_gating",
    "channel_spec": ".channel_gating",
    "NeuronGatedMlp": ".neuron_gating",
    "NeuronGatedGluMlp": ".neuron_gating",
    "NeuronGatedSwiGLU": ".neuron_gating",
    "gate_neurons_": ".neuron_gating",
    "neuron_spec": ".neuron_gating",
    "calibrate_neurons_": ".neuron_gating",
    "train_predictors_": ".neuron_gating",
    "set_strategy_": ".neuron_gating",
    "HeadGatedAttention": ".head_gating",
    "gate_heads_": ".head_gating",
    "head_spec": ".head_gating",
    "set_head_strategy_": ".head_gating",
    "train_head_predictors_": ".head_gating",
    "calibrate_tokens_": ".token_setup",
    "gate_tokens_": ".token_setup",
    "token_spec": ".token_setup",
    "Packing": ".token_pack",
    "packed_attention": ".token_pack",
    "route_blocks_": ".routing",
    "depth_spec": ".routing",
}

__all__ = ["GateSlot", "GatedLayer", "SlotSpec", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

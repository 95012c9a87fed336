"""The timm integration table: which timm classes can be gated for which dimension, and how.

Tables only: no patching of timm classes, no import-time side effects beyond importing timm.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from timm.models.convnext import ConvNeXtBlock
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn

from ..layers.attention import GatedAttention
from ..layers.base import GatedLayer
from ..layers.conv import (
    GatedBasicBlock,
    GatedBottleneck,
    GatedDepthwiseSeparableConv,
    GatedEdgeResidual,
    GatedInvertedResidual,
)
from ..layers.mlp import GatedGluMlp, GatedMlp, GatedSwiGLU
from ..layers.residual import Branch

__all__ = ["BRANCHES", "GATED_LAYERS", "UNSUPPORTED", "branches_of"]

#: dimension -> host class -> gated class (exact host types only).
GATED_LAYERS: dict[str, dict[type[nn.Module], type[GatedLayer]]] = {
    "neurons": {Mlp: GatedMlp, GluMlp: GatedGluMlp, SwiGLU: GatedSwiGLU},
    "heads": {Attention: GatedAttention},
    "channels": {
        BasicBlock: GatedBasicBlock,
        Bottleneck: GatedBottleneck,
        InvertedResidual: GatedInvertedResidual,
        EdgeResidual: GatedEdgeResidual,
        DepthwiseSeparableConv: GatedDepthwiseSeparableConv,
    },
}

#: Host classes that look gatable for a dimension but are not, with the reason.
UNSUPPORTED: dict[str, dict[type[nn.Module], str]] = {
    "heads": {
        WindowAttention: "Swin's WindowAttention has no parameter-free step between the attention output and "
        "'proj' where a head gate could sit exactly (gate its MLP 'neurons' and 'layers' instead)",
    },
    "channels": {
        ConvNeXtBlock: "a ConvNeXt block's internal channels are its MLP's hidden units: use the 'neurons' dimension",
    },
}


def _all_but(block: nn.Module, *excluded: str) -> tuple[str, ...]:
    return tuple(n for n, _ in block.named_children() if n not in excluded)


def _skip_branch(block: nn.Module) -> list[Branch] | None:
    return [Branch("drop_path", _all_but(block, "drop_path"))] if block.has_skip else None


#: host block class -> function giving its residual branches (None: the block has no residual branch).
BRANCHES: dict[type[nn.Module], Callable[[nn.Module], list[Branch] | None]] = {
    Block: lambda b: [Branch("drop_path1", ("norm1", "attn", "ls1")), Branch("drop_path2", ("norm2", "mlp", "ls2"))],
    SwinTransformerBlock: lambda b: [Branch("drop_path1", ("norm1", "attn")), Branch("drop_path2", ("norm2", "mlp"))],
    BasicBlock: lambda b: [Branch("drop_path", _all_but(b, "downsample", "act2", "drop_path"))],
    Bottleneck: lambda b: [Branch("drop_path", _all_but(b, "downsample", "act3", "drop_path"))],
    ConvNeXtBlock: lambda b: [Branch("drop_path", _all_but(b, "shortcut", "drop_path"))],
    InvertedResidual: _skip_branch,
    EdgeResidual: _skip_branch,
    DepthwiseSeparableConv: _skip_branch,
}


def host_type(module: nn.Module) -> type[nn.Module]:
    """The host class of ``module`` (its own class, or the host class of a gated layer)."""
    return getattr(type(module), "host_class", type(module))


def branches_of(module: nn.Module) -> list[Branch] | None:
    """Residual branches of ``module`` if its host class is in :data:`BRANCHES`, else None."""
    fn = BRANCHES.get(host_type(module))
    return fn(module) if fn is not None else None

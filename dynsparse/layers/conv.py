"""Gated timm conv blocks: a ``channels`` gate on the internal channels of a block (not its residual width).

Each gate sits after the block's norm/activation, in a parameter-free child, so removing a channel slices
the producing conv/BN and the consuming conv exactly.
"""

from __future__ import annotations

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ..modules import is_stateless
from .base import GatedLayer, SlotSpec

__all__ = [
    "GatedBasicBlock",
    "GatedBottleneck",
    "GatedDepthwiseSeparableConv",
    "GatedEdgeResidual",
    "GatedInvertedResidual",
]


def _stateless(host: nn.Module, *children: str) -> str | None:
    for c in children:
        if not is_stateless(getattr(host, c)):
            return f"its {c!r} ({type(getattr(host, c)).__name__}) holds parameters, so no gate can take its place"
    return None


def _grouped(conv: nn.Conv2d, name: str, depthwise_ok: bool = False) -> str | None:
    g = conv.groups
    if g == 1 or (depthwise_ok and g == conv.in_channels == conv.out_channels):
        return None
    return f"{name} is a grouped conv (groups={g}); removing single channels would break its groups"


class GatedBasicBlock(GatedLayer, BasicBlock):
    """timm ResNet ``BasicBlock`` with a ``channels`` gate between ``conv1`` and ``conv2`` (in the ``act1`` slot)."""

    host_class = BasicBlock
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _stateless(host, "act1") or _grouped(host.conv2, "conv2")

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("act1", host.conv1.out_channels, dim=1, scope=("conv1", "bn1", "conv2"))]


class GatedBottleneck(GatedLayer, Bottleneck):
    """timm ResNet ``Bottleneck`` with ``channels`` gates after ``conv1`` (``act1`` slot) and ``conv2`` (``act2``)."""

    host_class = Bottleneck
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _stateless(host, "act1", "act2") or _grouped(host.conv2, "conv2")

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [
            SlotSpec("act1", host.conv1.out_channels, dim=1, scope=("conv1", "bn1", "conv2")),
            SlotSpec("act2", host.conv2.out_channels, dim=1, scope=("conv2", "bn2", "conv3")),
        ]


class GatedInvertedResidual(GatedLayer, InvertedResidual):
    """timm EfficientNet/MobileNet ``InvertedResidual`` with a ``channels`` gate on the expansion channels.

    The gate sits after ``bn2`` (depthwise conv + norm + act), in the ``aa`` slot, before squeeze-excite, so
    a removed channel contributes nothing to the SE pooling either.
    """

    host_class = InvertedResidual
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if host.conv_s2d is not None:
            return "space-to-depth stems are not supported"
        return _stateless(host, "aa") or _grouped(host.conv_dw, "conv_dw", depthwise_ok=True)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [
            SlotSpec(
                "aa", host.conv_dw.out_channels, dim=1, scope=("conv_pw", "bn1", "conv_dw", "bn2", "se", "conv_pwl")
            )
        ]


class GatedEdgeResidual(GatedLayer, EdgeResidual):
    """timm ``EdgeResidual`` (fused MBConv) with a ``channels`` gate on the expansion channels (``aa`` slot)."""

    host_class = EdgeResidual
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _stateless(host, "aa") or _grouped(host.conv_exp, "conv_exp")

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("aa", host.conv_exp.out_channels, dim=1, scope=("conv_exp", "bn1", "se", "conv_pwl"))]


class GatedDepthwiseSeparableConv(GatedLayer, DepthwiseSeparableConv):
    """timm ``DepthwiseSeparableConv`` with a ``channels`` gate on the depthwise channels (``aa`` slot, before SE).

    The depthwise channels are the block's input channels, so the block must have no residual: a removed
    channel is then also removed from the producer of the block's input (handled by the converter).
    """

    host_class = DepthwiseSeparableConv
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if host.has_skip:
            return "its depthwise channels are the residual width (the block has a skip connection)"
        if host.conv_s2d is not None:
            return "space-to-depth stems are not supported"
        return _stateless(host, "aa") or _grouped(host.conv_dw, "conv_dw", depthwise_ok=True)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("aa", host.conv_dw.out_channels, dim=1, scope=("conv_dw", "bn1", "se", "conv_pw"))]

"""Gated timm conv blocks: a ``channels`` gate on the internal channels of a block (not its residual width).

Each gate sits after the block's norm/activation, in a parameter-free child, so removing a channel slices
the producing conv/BN and the consuming conv exactly.
"""

from __future__ import annotations

from timm.layers.blur_pool import BlurPool2d
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from ..convert.surgery import slice_bn_, slice_conv_in_, slice_conv_out_, slice_depthwise_
from ..errors import UnsupportedModuleError
from ..modules import is_stateless
from .base import GatedLayer, Producer, SlotSpec, unit_rows

__all__ = [
    "GatedBasicBlock",
    "GatedBottleneck",
    "GatedDepthwiseSeparableConv",
    "GatedEdgeResidual",
    "GatedInvertedResidual",
    "is_channel_norm",
    "norm_reason",
]


def _stateless(host: nn.Module, *children: str) -> str | None:
    for c in children:
        if not is_stateless(getattr(host, c)):
            return f"its {c!r} ({type(getattr(host, c)).__name__}) holds parameters, so no gate can take its place"
    return None


def _conv(host: nn.Module, name: str, depthwise: bool = False) -> str | None:
    """Why the conv ``name`` of ``host`` cannot be sliced on single channels, or None when it can.

    The slicers need a plain ``nn.Conv2d`` (timm's ``Conv2dSame`` is one): ungrouped, or for ``depthwise`` one
    filter per channel. A split conv (timm ``MixedConv2d``, MixNet) or a grouped one is refused.
    """
    conv = getattr(host, name)
    if not isinstance(conv, nn.Conv2d):
        return f"{name} is a {type(conv).__name__}, not an nn.Conv2d, so its channels cannot be sliced"
    g = conv.groups
    if depthwise:
        if g == conv.in_channels == conv.out_channels:
            return None
        kind = "an ungrouped" if g == 1 else "a grouped"
        return f"{name} is {kind} conv, not depthwise (groups={g}, {conv.in_channels} -> {conv.out_channels} channels)"
    if g == 1:
        return None
    return f"{name} is a grouped conv (groups={g}); removing single channels would break its groups"


#: Norms that normalize each channel alone (``slice_bn_`` slices them exactly); a GroupNorm / LayerNorm mixes channels.
_PER_CHANNEL_NORMS = (nn.Identity, nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, FrozenBatchNormAct2d)


def is_channel_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a norm acting on each channel alone (BatchNorm, frozen BatchNorm): ``slice_bn_`` slices it."""
    return isinstance(m, _PER_CHANNEL_NORMS) and not isinstance(m, nn.Identity)


def norm_reason(host: nn.Module, *names: str) -> str | None:
    """Why a norm ``names`` of ``host`` on the gated channels cannot be sliced on single channels, or None."""
    for name in names:
        norm = getattr(host, name)
        if not isinstance(norm, _PER_CHANNEL_NORMS):
            return (
                f"{name} is a {type(norm).__name__}, which normalizes over several channels, so removing a channel "
                "would change the others (only per-channel norms such as BatchNorm can be sliced)"
            )
    return None


def _convs(host: nn.Module, *names: str, depthwise: str | None = None) -> str | None:
    """The first reason (`_conv`) why one of the convs ``names`` cannot be sliced; ``depthwise`` names the dw one."""
    for name in names:
        reason = _conv(host, name, depthwise=name == depthwise)
        if reason is not None:
            return reason
    return None


#: Anti-aliasing modules that act on each channel alone and hold no per-channel state (nothing to slice).
_CHANNELWISE_AA = (nn.Identity, nn.AvgPool2d, nn.MaxPool2d)


def _slice_aa_(m: nn.Module, idx: Tensor, what: str) -> None:
    """Slice the anti-aliasing module ``m.aa`` on the kept channels ``idx``, or refuse by name.

    A ``BlurPool2d`` blurs each channel alone with a fixed filter; one built for a channel count holds a
    ``(channels, 1, k, k)`` buffer and convolves with ``groups=channels``, so both are sliced with the producer.
    """
    aa = getattr(m, "aa", None)
    inner = getattr(aa, "inner", aa)  # the slot may hold the aa module
    if inner is None or isinstance(inner, _CHANNELWISE_AA) or type(inner).__name__ == "GateSlot":
        return
    if isinstance(inner, BlurPool2d):
        if inner.channels is not None:
            inner.filt = inner.filt[idx].contiguous()
            inner.channels = int(idx.numel())
        return
    raise UnsupportedModuleError(
        "", type(m).__name__, "channels", f"anti-aliasing ({type(inner).__name__}) on {what} cannot be sliced yet"
    )


#: (reduce, expand) children of the squeeze-excite modules the converter slices (timm ``SqueezeExcite``, ``SEModule``).
_SE_CHILDREN = (("conv_reduce", "conv_expand"), ("fc1", "fc2"))


def _se_reason(host: nn.Module) -> str | None:
    """Why the squeeze-excite module ``host.se`` on the gated channels cannot be sliced, or None when it can."""
    se = host.se
    if se is None or isinstance(se, nn.Identity) or any(hasattr(se, r) and hasattr(se, e) for r, e in _SE_CHILDREN):
        return None
    name = type(se).__name__
    return f"its squeeze-excite module {name} is not known to the converter, so its channels cannot be sliced"


def _slice_se_(se: nn.Module, idx: Tensor, scale: Tensor | None, owner: nn.Module) -> None:
    """Slice a squeeze-excite module on the gated channels; ``scale`` also folds into its reduction input."""
    if isinstance(se, nn.Identity) or se is None:
        return
    for reduce, expand in _SE_CHILDREN:
        if hasattr(se, reduce) and hasattr(se, expand):
            slice_conv_in_(getattr(se, reduce), idx, scale)
            slice_conv_out_(getattr(se, expand), idx)
            return
    raise UnsupportedModuleError(
        "",
        type(owner).__name__,
        "channels",
        f"its squeeze-excite module {type(se).__name__} is not known to the converter",
    )


def _conv_rows(module: nn.Module, conv: str) -> list[Producer]:
    return [Producer(f"{conv}.weight", 0, unit_rows(getattr(module, conv).out_channels))]


class GatedBasicBlock(GatedLayer, BasicBlock):
    """timm ResNet ``BasicBlock`` with a ``channels`` gate between ``conv1`` and ``conv2`` (in the ``act1`` slot)."""

    host_class = BasicBlock
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return _stateless(host, "act1") or _convs(host, "conv1", "conv2") or norm_reason(host, "bn1")

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("act1", host.conv1.out_channels, dim=1, scope=("conv1", "bn1", "aa", "conv2"))]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        return _conv_rows(module, "conv1")

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        return "bn1"

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        _slice_aa_(module, idx, "conv1's output")
        slice_conv_out_(module.conv1, idx)
        slice_bn_(module.bn1, idx)
        slice_conv_in_(module.conv2, idx, scale)


class GatedBottleneck(GatedLayer, Bottleneck):
    """timm ResNet ``Bottleneck`` with ``channels`` gates after ``conv1`` (``act1`` slot) and ``conv2`` (``act2``)."""

    host_class = Bottleneck
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return (
            _stateless(host, "act1", "act2")
            or _convs(host, "conv1", "conv2", "conv3")
            or norm_reason(host, "bn1", "bn2")
        )

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [
            SlotSpec("act1", host.conv1.out_channels, dim=1, scope=("conv1", "bn1", "conv2")),
            SlotSpec("act2", host.conv2.out_channels, dim=1, scope=("conv2", "bn2", "aa", "conv3")),
        ]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        return _conv_rows(module, "conv1" if child == "act1" else "conv2")

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        return "bn1" if child == "act1" else "bn2"

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        if child == "act1":
            slice_conv_out_(module.conv1, idx)
            slice_bn_(module.bn1, idx)
            slice_conv_in_(module.conv2, idx, scale)
        else:
            _slice_aa_(module, idx, "conv2's output")
            slice_conv_out_(module.conv2, idx)
            slice_bn_(module.bn2, idx)
            slice_conv_in_(module.conv3, idx, scale)


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
        reason = _convs(host, "conv_pw", "conv_dw", "conv_pwl", depthwise="conv_dw")
        return _stateless(host, "aa") or reason or norm_reason(host, "bn1", "bn2") or _se_reason(host)

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [
            SlotSpec(
                "aa",
                host.conv_dw.out_channels,
                dim=1,
                scope=("conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl"),
            )
        ]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        return [*_conv_rows(module, "conv_pw"), Producer("conv_dw.weight", 0, unit_rows(module.conv_dw.out_channels))]

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        return "bn2"

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        slice_conv_out_(module.conv_pw, idx)
        slice_bn_(module.bn1, idx)
        slice_depthwise_(module.conv_dw, idx)
        slice_bn_(module.bn2, idx)
        _slice_aa_(module, idx, "conv_dw's output")
        _slice_se_(module.se, idx, scale, module)
        slice_conv_in_(module.conv_pwl, idx, scale)


class GatedEdgeResidual(GatedLayer, EdgeResidual):
    """timm ``EdgeResidual`` (fused MBConv) with a ``channels`` gate on the expansion channels (``aa`` slot)."""

    host_class = EdgeResidual
    dimension = "channels"

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        return (
            _stateless(host, "aa")
            or _convs(host, "conv_exp", "conv_pwl")
            or norm_reason(host, "bn1")
            or _se_reason(host)
        )

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("aa", host.conv_exp.out_channels, dim=1, scope=("conv_exp", "bn1", "aa", "se", "conv_pwl"))]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        return _conv_rows(module, "conv_exp")

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        return "bn1"

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        slice_conv_out_(module.conv_exp, idx)
        slice_bn_(module.bn1, idx)
        _slice_aa_(module, idx, "conv_exp's output")
        _slice_se_(module.se, idx, scale, module)
        slice_conv_in_(module.conv_pwl, idx, scale)


class GatedDepthwiseSeparableConv(GatedLayer, DepthwiseSeparableConv):
    """timm ``DepthwiseSeparableConv`` with a ``channels`` gate on the depthwise channels (``aa`` slot, before SE).

    The gate multiplies ``bn1(conv_dw(x))`` (norm + activation included) before squeeze-excite and ``conv_pw``. The
    depthwise channels are the block's input channels, so the block must have no residual, and converting a gate
    that closes channels also slices the producer of the block's input, outside the block (``input_slots``): in a
    timm EfficientNet / MobileNetV3 the stem (``conv_stem`` out + ``bn1``) for ``blocks.0.0``, or the output
    projection of the block before (``conv_pw`` + ``bn2`` of a DS block, ``conv_pwl`` + ``bn3`` of an
    ``InvertedResidual``) when that block has no skip (see `dynsparse.convert.producer`). A non-binary eval value
    is folded where the block is linear in it: the SE's ``conv_reduce`` input and ``conv_pw``'s input columns.

    Example:
        >>> m = timm.create_model("tf_efficientnet_lite0", num_classes=10)  # doctest: +SKIP
        >>> ds.sparsify_(m, {"channels": "fixed"}, include="blocks.0.*")  # doctest: +SKIP
        >>> ds.fix_gates_(m, {"blocks.0.0.aa": torch.arange(32) < 8})  # doctest: +SKIP
        >>> ds.convert(m).conv_stem.out_channels  # doctest: +SKIP
        8
    """

    host_class = DepthwiseSeparableConv
    dimension = "channels"
    input_slots = ("aa",)

    @classmethod
    def unsupported_reason(cls, host: nn.Module) -> str | None:
        if host.has_skip:
            return "its depthwise channels are the residual width (the block has a skip connection)"
        if host.conv_s2d is not None:
            return "space-to-depth stems are not supported"
        return (
            _stateless(host, "aa")
            or _convs(host, "conv_dw", "conv_pw", depthwise="conv_dw")
            or norm_reason(host, "bn1")
            or _se_reason(host)
        )

    @classmethod
    def _slot_specs(cls, host: nn.Module) -> list[SlotSpec]:
        return [SlotSpec("aa", host.conv_dw.out_channels, dim=1, scope=("conv_dw", "bn1", "aa", "se", "conv_pw"))]

    @classmethod
    def producers(cls, module: nn.Module, child: str) -> list[Producer]:
        return [Producer("conv_dw.weight", 0, unit_rows(module.conv_dw.out_channels))]

    @classmethod
    def unit_norm(cls, module: nn.Module, child: str) -> str | None:
        return "bn1"

    @classmethod
    def slice_(cls, module: nn.Module, child: str, idx: Tensor, scale: Tensor | None = None) -> None:
        """Slice the block's own part (``conv_dw``, ``bn1``, SE, ``conv_pw`` input); the caller slices the producer."""
        slice_depthwise_(module.conv_dw, idx)
        slice_bn_(module.bn1, idx)
        _slice_aa_(module, idx, "conv_dw's output")
        _slice_se_(module.se, idx, scale, module)
        slice_conv_in_(module.conv_pw, idx, scale)

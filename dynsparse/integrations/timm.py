"""The timm integration table: which timm classes can be gated for which dimension, and how.

Tables only: no patching of timm classes, no import-time side effects beyond importing timm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import Attention, GluMlp, Mlp, SwiGLU
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from timm.models.convnext import ConvNeXtBlock
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3, MobileNetV3Features
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn

from ..convert.surgery import scale_bn_
from ..convert.zero import ZeroBranch
from ..errors import UnsupportedModuleError
from ..layers.attention import GatedAttention
from ..layers.base import GatedLayer
from ..layers.conv import (
    GatedBasicBlock,
    GatedBottleneck,
    GatedDepthwiseSeparableConv,
    GatedEdgeResidual,
    GatedInvertedResidual,
    norm_reason,
)
from ..layers.mlp import GatedGluMlp, GatedMlp, GatedSwiGLU
from ..layers.residual import Branch

__all__ = [
    "BRANCHES",
    "GATED_LAYERS",
    "INPUT_PRODUCERS",
    "OUTPUT_PROJECTIONS",
    "UNSUPPORTED",
    "branches_of",
    "close_branches",
    "fold_branch_scale_",
    "input_producers",
    "output_projection",
    "returned_outputs",
    "unknown_block_reason",
]

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


#: host block class -> (conv, norm): without a skip connection, the block's output is ``norm(conv(...))`` (the norm
#: may end in an activation), so its output channels are sliced there (for a gate on the next block's input).
OUTPUT_PROJECTIONS: dict[type[nn.Module], tuple[str, str]] = {
    InvertedResidual: ("conv_pwl", "bn3"),
    EdgeResidual: ("conv_pwl", "bn2"),
    DepthwiseSeparableConv: ("conv_pw", "bn2"),
    ConvBnAct: ("conv", "bn1"),
}

#: host model class -> child -> the children that produce that child's input, conv first (``forward_features``).
INPUT_PRODUCERS: dict[type[nn.Module], dict[str, tuple[str, ...]]] = {
    EfficientNet: {"blocks": ("conv_stem", "bn1")},
    MobileNetV3: {"blocks": ("conv_stem", "bn1")},
}


#: host model class -> its child ``nn.Sequential`` whose children's outputs the model also returns (a ``features_only``
#: model runs the stages one by one and returns some stage outputs as feature maps).
RETURNED_OUTPUTS: dict[type[nn.Module], str] = {EfficientNetFeatures: "blocks", MobileNetV3Features: "blocks"}


def returned_outputs(parent: nn.Module, child: str) -> str | None:
    """Why ``parent`` reads the outputs of the children of its ``nn.Sequential`` ``child`` itself (so a producer walk
    must not slice one), or None when only the next child reads each output."""
    if RETURNED_OUTPUTS.get(type(parent)) != child:
        return None
    return f"{type(parent).__name__} also returns the outputs of the stages in {child!r} as feature maps"


def output_projection(block: nn.Module) -> tuple[str, str] | None:
    """``(conv, norm)`` children that alone produce ``block``'s output channels; None for a block not in the table.

    Raises:
        UnsupportedModuleError: a known block whose output is more than that (a skip connection adds its input;
            anti-aliasing follows the norm).
    """
    host = host_type(block)
    proj = OUTPUT_PROJECTIONS.get(host)
    if proj is None:
        return None
    if getattr(block, "has_skip", False):
        raise UnsupportedModuleError(
            "",
            type(block).__name__,
            "channels",
            "that block has a skip connection (its output is the sum with its own input), so its output channels "
            "are a residual width that cannot be sliced",
        )
    reason = norm_reason(block, proj[1])
    if reason is not None:
        raise UnsupportedModuleError("", type(block).__name__, "channels", f"its output norm {reason}")
    aa = getattr(block, "aa", None)
    if host is ConvBnAct and aa is not None and not isinstance(aa, nn.Identity):
        raise UnsupportedModuleError(
            "", type(block).__name__, "channels", f"that block ends in anti-aliasing ({type(aa).__name__})"
        )
    return proj


def input_producers(parent: nn.Module, child: str) -> tuple[str, ...] | None:
    """Children of ``parent`` that produce the input of its child ``child`` (conv first), or None when unknown."""
    return INPUT_PRODUCERS.get(type(parent), {}).get(child)


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
    """Residual branches of ``module`` if its host class is in `BRANCHES`, else None."""
    fn = BRANCHES.get(host_type(module))
    return fn(module) if fn is not None else None


_DROP_PATHS = ("drop_path", "drop_path1", "drop_path2")


def unknown_block_reason(module: nn.Module) -> str | None:
    """A timm block with a stochastic-depth child (a residual branch) whose layout is not in `BRANCHES`, or None.

    Such a block (BEiT, EVA, CaiT, Mixer, ResNetV2, ``CondConvResidual``...) would otherwise be passed over in
    silence while the model's known blocks get ``layers`` gates. A block that says it has no skip is not one.
    """
    host = host_type(module)
    if host in BRANCHES or not host.__module__.startswith("timm.") or getattr(module, "has_skip", True) is False:
        return None
    if not any(name in module._modules for name in _DROP_PATHS):
        return None
    return f"no residual branch layout is known for {host.__module__}.{host.__name__}"


# ---------------------------------------------------------------------------------------------------------------
# Conversion of residual branches: fold a non-binary branch gate value, and remove closed branches.


def _scale_linear_(m: nn.Module, v: float) -> None:
    with torch.no_grad():
        m.weight.mul_(v)
        if m.bias is not None:
            m.bias.mul_(v)


def _scale_last_bn_(block: nn.Module, bn: str) -> None:
    def fold(v: float) -> None:
        norm = getattr(block, bn)
        act = getattr(norm, "act", None)
        if act is not None and not isinstance(act, nn.Identity):
            raise UnsupportedModuleError(
                "",
                type(block).__name__,
                "layers",
                f"{bn} ends in an activation, so a gate value {v:.4g} cannot be folded",
            )
        if host_type(block) in (BasicBlock, Bottleneck) and block.se is not None:
            raise UnsupportedModuleError(
                "",
                type(block).__name__,
                "layers",
                f"squeeze-excite follows {bn}, so a gate value {v:.4g} cannot be folded",
            )
        scale_bn_(norm, v)

    return fold


def _fold_vit(block: nn.Module, slot: str, v: float) -> None:
    ls, inner, last = ("ls1", "attn", "proj") if slot == "drop_path1" else ("ls2", "mlp", "fc2")
    ls_mod = getattr(block, ls, None)
    if ls_mod is not None and hasattr(ls_mod, "gamma"):
        with torch.no_grad():
            ls_mod.gamma.mul_(v)
    else:
        _scale_linear_(getattr(getattr(block, inner), last), v)


def _fold_convnext(block: nn.Module, slot: str, v: float) -> None:
    if block.gamma is not None:
        with torch.no_grad():
            block.gamma.mul_(v)
    else:
        _scale_linear_(block.mlp.fc2, v)


def fold_branch_scale_(block: nn.Module, slot: str, v: float) -> None:
    """Fold a branch gate's eval value ``v`` (0 < v < 1) into the last affine step of the branch."""
    host = host_type(block)
    if host in (Block, SwinTransformerBlock):
        return _fold_vit(block, slot, v)
    if host is ConvNeXtBlock:
        return _fold_convnext(block, slot, v)
    last_bn = {
        BasicBlock: "bn2",
        Bottleneck: "bn3",
        InvertedResidual: "bn3",
        EdgeResidual: "bn2",
        DepthwiseSeparableConv: "bn2",
    }.get(host)
    if last_bn is None:
        raise UnsupportedModuleError("", type(block).__name__, "layers", "no rule to fold a branch gate value")
    _scale_last_bn_(block, last_bn)(v)


def _close_transformer(block: nn.Module, closed: set[str]) -> nn.Module | None:
    if closed >= {"drop_path1", "drop_path2"}:
        return nn.Identity()
    for slot in closed:
        norm, inner, ls = ("norm1", "attn", "ls1") if slot == "drop_path1" else ("norm2", "mlp", "ls2")
        setattr(block, inner, ZeroBranch())
        setattr(block, norm, nn.Identity())
        if hasattr(block, ls):
            setattr(block, ls, nn.Identity())
    return None


def _close_resnet(block: nn.Module, act: str) -> nn.Module:
    """The block without its branch: ``act(shortcut(x))``.

    Without a downsample the activation reads the block's input, the previous block's activation output: an in-place
    activation would rewrite that tensor, which autograd still needs (backward raised), so it is made out of place.
    """
    post = getattr(block, act)
    if block.downsample is not None:
        return nn.Sequential(block.downsample, post)
    if getattr(post, "inplace", False):
        post.inplace = False
    return post


def close_branches(block: nn.Module, closed: set[str]) -> nn.Module | None:
    """Remove the closed branches (slot names) of ``block``.

    Returns a module that replaces the whole block (e.g. ``nn.Identity`` when nothing is left), or ``None``
    when the block was edited in place (a ViT block that keeps one of its two branches).
    """
    host = host_type(block)
    if host in (Block, SwinTransformerBlock):
        return _close_transformer(block, closed)
    if host is BasicBlock:
        return _close_resnet(block, "act2")
    if host is Bottleneck:
        return _close_resnet(block, "act3")
    if host is ConvNeXtBlock:
        return block.shortcut
    if host in (InvertedResidual, EdgeResidual, DepthwiseSeparableConv):
        return nn.Identity()
    raise UnsupportedModuleError("", type(block).__name__, "layers", "no rule to remove a closed branch")

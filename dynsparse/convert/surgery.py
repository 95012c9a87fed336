"""Slice Linear / Conv / BatchNorm modules along one axis, in place, keeping their class.

These act on a *copy* of the user's model (``convert`` deep-copies first), so no optimizer ever holds a
stale reference. Every function updates the size attributes code reads at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "scale_bn_",
    "slice_bn_",
    "slice_conv_in_",
    "slice_conv_out_",
    "slice_depthwise_",
    "slice_linear_in_",
    "slice_linear_out_",
    "slice_param_",
]


def _memory_format_of(t: Tensor | None) -> torch.memory_format:
    """The memory format ``t`` is stored in: ``channels_last`` (4-D) / ``channels_last_3d`` (5-D) when it is dense
    in that layout and not in the default one, else ``contiguous_format`` (also when both apply, e.g. 1x1 kernels)."""
    if t is not None and not t.is_contiguous():
        if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _new(t: Tensor, like: nn.Parameter | Tensor | None) -> nn.Parameter | Tensor:
    # a fresh, dense copy (never a view of the old weight) in the memory format of the tensor it replaces, so a
    # ``channels_last`` model stays ``channels_last`` and oneDNN does not reorder sliced weights at every call
    t = t.detach().clone(memory_format=_memory_format_of(like if isinstance(like, Tensor) else None))
    if isinstance(like, nn.Parameter):
        return nn.Parameter(t, requires_grad=like.requires_grad)
    return t


def slice_param_(module: nn.Module, name: str, idx: Tensor, dim: int = 0, scale: Tensor | None = None) -> None:
    """Replace ``module.<name>`` (a parameter or buffer) by its ``index_select`` along ``dim``, times ``scale``."""
    t = getattr(module, name)
    if t is None:
        return
    s = t.detach().index_select(dim, idx.to(t.device))
    if scale is not None:
        shape = [1] * s.ndim
        shape[dim] = -1
        s = s * scale.to(device=s.device, dtype=s.dtype).view(shape)
    setattr(module, name, _new(s, t))


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def slice_linear_out_(m: nn.Module, idx: Tensor) -> None:
    """Keep output rows ``idx`` of a Linear (or a 1x1 Conv2d used as one)."""
    if _is_conv(m):
        return slice_conv_out_(m, idx)
    slice_param_(m, "weight", idx, 0)
    slice_param_(m, "bias", idx, 0)
    m.out_features = len(idx)


def slice_linear_in_(m: nn.Module, idx: Tensor, scale: Tensor | None = None) -> None:
    """Keep input columns ``idx`` of a Linear (or a 1x1 Conv2d), scaling them by ``scale``."""
    if _is_conv(m):
        return slice_conv_in_(m, idx, scale)
    slice_param_(m, "weight", idx, 1, scale)
    m.in_features = len(idx)


def slice_conv_out_(m: nn.Module, idx: Tensor) -> None:
    """Keep output channels ``idx`` of an ungrouped conv."""
    assert m.groups == 1, "grouped convs are refused before slicing"
    slice_param_(m, "weight", idx, 0)
    slice_param_(m, "bias", idx, 0)
    m.out_channels = len(idx)


def slice_conv_in_(m: nn.Module, idx: Tensor, scale: Tensor | None = None) -> None:
    """Keep input channels ``idx`` of an ungrouped conv, scaling them by ``scale``."""
    assert m.groups == 1, "grouped convs are refused before slicing"
    slice_param_(m, "weight", idx, 1, scale)
    m.in_channels = len(idx)


def slice_depthwise_(m: nn.Module, idx: Tensor) -> None:
    """Keep channels ``idx`` of a depthwise conv (groups == channels)."""
    slice_param_(m, "weight", idx, 0)
    slice_param_(m, "bias", idx, 0)
    m.in_channels = m.out_channels = m.groups = len(idx)


def slice_bn_(m: nn.Module, idx: Tensor) -> None:
    """Keep channels ``idx`` of a BatchNorm (incl. timm's ``BatchNormAct2d``) or a channel-wise norm."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(m, name, None) is not None:
            slice_param_(m, name, idx, 0)
    if hasattr(m, "num_features"):
        m.num_features = len(idx)


def scale_bn_(m: nn.Module, s: float | Tensor) -> None:
    """Multiply a BatchNorm's affine output by ``s`` (weight and bias), so ``bn(x) * s`` is folded in."""
    with torch.no_grad():
        m.weight.mul_(s)
        m.bias.mul_(s)

"""Masked twins of ``nn.Linear`` / ``nn.Conv2d`` (`MaskedLinear`, `MaskedConv2d`) and their swaps to and from the host.

A masked layer is the host class with the same ``weight`` and ``bias`` and one new bool buffer ``weight_mask``; its
forward multiplies the weight by the mask, so a masked weight has no effect on the output and gets a zero gradient.
Its state dict holds the masked weight (0 under the mask), whatever an optimizer did to the raw ``weight``.
Deciding which weights to mask is `dynsparse.prune.unstructured` (which re-exports both classes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..modules import adopt, successor_state

__all__ = ["MaskedConv2d", "MaskedLinear"]


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a keep mask: ``y = x (W ⊙ M)ᵀ + b``.

    Same constructor, parameters and ``forward`` signature as ``nn.Linear``; adds the buffer ``weight_mask``
    (bool, shape of ``weight``, all True at construction). Masked weights have zero effect and zero gradient, and
    the state dict's ``weight`` is ``masked_weight()`` (an optimizer with momentum or Adam state may still move
    the raw weight under the mask: ``dynsparse.prune.reapply_masks_on_step`` keeps it at 0).

    Examples:
        >>> m = MaskedLinear.from_module(nn.Linear(4, 3))
        >>> sorted(m.state_dict())
        ['bias', 'weight', 'weight_mask']
    """

    host = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    @classmethod
    def from_module(cls, module: nn.Linear) -> MaskedLinear:
        """A `MaskedLinear` sharing ``module``'s parameters, hooks and training flag, with an all-True mask."""
        return _from_host(cls, module)

    def masked_weight(self) -> Tensor:
        """``weight * weight_mask`` (the weight the forward uses)."""
        return self.weight * self.weight_mask

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_masked(self, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={_mask_sparsity(self.weight_mask):.4f}"


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is multiplied by a keep mask (buffer ``weight_mask``); see `MaskedLinear`."""

    host = nn.Conv2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("weight_mask", torch.ones(self.weight.shape, dtype=torch.bool, device=self.weight.device))

    @classmethod
    def from_module(cls, module: nn.Conv2d) -> MaskedConv2d:
        """A `MaskedConv2d` sharing ``module``'s parameters, hooks and training flag, with an all-True mask."""
        return _from_host(cls, module)

    def masked_weight(self) -> Tensor:
        """``weight * weight_mask`` (the weight the forward uses)."""
        return self.weight * self.weight_mask

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W')."""
        return self._conv_forward(x, self.weight * self.weight_mask, self.bias)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _save_masked(self, destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={_mask_sparsity(self.weight_mask):.4f}"


#: Host class -> masked twin.
TWINS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}
_MASKED = (MaskedLinear, MaskedConv2d)


def _save_masked(module: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    """Put the masked weight in the state dict (the parameter itself with ``keep_vars``, as torch does)."""
    if not keep_vars:
        destination[prefix + "weight"] = module.masked_weight().detach()


def _mask_sparsity(mask: Tensor) -> float:
    return 1.0 - int(mask.count_nonzero()) / mask.numel() if mask.numel() else 0.0


def _from_host(cls: type, module: nn.Module) -> nn.Module:
    if type(module) is not cls.host:
        reason = f"{cls.__name__}.from_module takes exactly {cls.host.__name__}"
        raise UnsupportedModuleError("", type(module).__name__, "weights", reason, "prune")
    new = adopt(module, cls)
    new.register_buffer("weight_mask", torch.ones(module.weight.shape, dtype=torch.bool, device=module.weight.device))
    return new


def _to_host(module: nn.Module) -> nn.Module:
    """The plain host module sharing ``module``'s parameters and hooks (the hook dicts themselves, so handles
    registered before still remove them), without ``weight_mask``."""
    host = type(module).host
    new = host.__new__(host)
    new.__dict__.update(successor_state(module))
    del new._buffers["weight_mask"]
    new._non_persistent_buffers_set.discard("weight_mask")
    return new


@torch.no_grad()
def _zero_masked_(module: nn.Module) -> None:
    mask = module.weight_mask
    if mask.dtype == torch.bool:
        module.weight.masked_fill_(~mask, 0)
    else:
        module.weight.mul_(mask)


def _masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for fqn, module in model.named_modules():
        if isinstance(module, _MASKED):
            yield fqn, module

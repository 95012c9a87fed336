"""``ZeroBranch``: what a removed residual branch becomes when its block must keep calling it."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["ZeroBranch"]


class ZeroBranch(nn.Module):
    """Returns zeros shaped like its first input and computes nothing else (no parameters).

    Used where a block's ``forward`` calls a branch module whose gate was closed (e.g. a ViT block whose
    attention branch was removed but whose MLP branch stays). Accepts and ignores extra arguments
    (``attn_mask=...``) so it can stand in for any branch module.
    """

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return x.new_zeros(x.shape)

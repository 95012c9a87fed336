"""Per-input channel gates for conv blocks: Feature Boosting and Suppression (FBS, Gao et al., ICLR 2019).

An `FBSGate` reads a summary of a block's input, one number per input channel (its global average pool,
``ss(x)``), and gives every gated channel a saliency

    π(x) = ReLU(W · ss(x) + b)                                            (B, C)

then keeps the ``k = ⌈keep · C⌉`` most salient channels of each input (k-winners-take-all) and zeroes the
rest. The kept saliencies also *boost*: the gated layer's output channel ``c`` is multiplied by ``π_c(x)``
(FBS's ``ŷ = f(x) ⊙ π_wta(x)``), so ``forward(x)`` returns the multiplier ``π ⊙ 1[c kept]``.

Training follows the paper: the selection is hard (no gradient through the choice of channels), the gradient
reaches ``W`` and ``b`` through the kept saliencies, and `penalty` is the L1 norm of ``π`` (summed over channels,
averaged over the batch) times ``weight``. ``keep`` is the run-time knob (``dynsparse.set_budget_``).

Choices (not fixed by the paper):
    * ``W`` starts small (normal, std ``init_std``) and ``b`` at 1, so every saliency starts near 1: a gate put
      into a trained network starts as "keep the top half, unscaled", with input-dependent (if arbitrary) ranks.
    * Ties are broken by ``torch.topk``; the kept indices are returned sorted ascending.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .base import InputDependentGate

__all__ = ["CHANNEL_GATES", "FBSGate"]

#: Registered per-input channel gates: name -> class, built as ``cls(in_dim, num_units, keep=..., **kwargs)``.
CHANNEL_GATES: Registry[type[InputDependentGate]] = Registry("per-input channel gate")


@CHANNEL_GATES.register("fbs")
class FBSGate(InputDependentGate):
    """FBS saliency with k-winners-take-all over ``num_units`` channels (see the module doc).

    Args:
        in_dim: Channels of the input the saliency reads (the block's input).
        num_units: Gated channels C.
        keep: Fraction of channels kept per input, in (0, 1]: ``⌈keep · C⌉`` (at least one).
        weight: Weight of the L1 penalty on the saliencies (the paper's λ; 1e-8 [recall]).
        init_std: Standard deviation of the initial saliency weights (bias starts at 1).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Examples:
        >>> g = FBSGate(16, 8, keep=0.5).eval()
        >>> m = g(torch.randn(2, 16, 5, 5))
        >>> m.shape, (m > 0).sum(1).tolist()
        (torch.Size([2, 8]), [4, 4])
    """

    def __init__(
        self,
        in_dim: int,
        num_units: int,
        keep: float = 0.5,
        weight: float = 1e-8,
        init_std: float = 0.01,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_units, keep)
        if not isinstance(in_dim, int) or isinstance(in_dim, bool) or in_dim < 1:
            raise ConfigError(f"fbs: in_dim must be a positive int (the input channels), got {in_dim!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"fbs: weight (the L1 penalty weight) must be a number >= 0, got {weight!r}")
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or init_std < 0:
            raise ConfigError(f"fbs: init_std must be a number >= 0, got {init_std!r}")
        self.in_dim, self.weight, self.init_std = in_dim, float(weight), float(init_std)
        self.fc = nn.Linear(in_dim, num_units, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.fc.weight, std=self.init_std)
            nn.init.ones_(self.fc.bias)
        self._pi: Tensor | None = None

    def num_kept(self) -> int:
        """``⌈keep · C⌉`` channels kept per input (at least one); the paper's k-WTA count."""
        return max(1, min(self.num_units, math.ceil(self.keep * self.num_units - 1e-9)))

    def saliency(self, x: Tensor, cols: Tensor | None = None) -> Tensor:
        """(B, C) saliencies ``π = ReLU(W·ss(x) + b)``.

        Args:
            x: The block input (B, C_in, H, W), or its pooled summary (B, C_in).
            cols: If given, ``x`` holds only these input channels (sorted indices into ``in_dim``): the
                others are zero, so only these columns of ``W`` are used.
        """
        ss = x.mean((2, 3)) if x.dim() == 4 else x
        w = self.fc.weight if cols is None else self.fc.weight.index_select(1, cols)
        return F.relu(F.linear(ss, w, self.fc.bias))

    def decide(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-input decisions: kept channel indices (B, k), sorted ascending, and their saliencies (B, k).

        In training the saliencies carry the gradient; the choice itself does not.
        """
        pi = self.saliency(x)
        if self.training:
            self._pi = pi
        k = self.num_kept()
        idx = pi.detach().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        return idx, pi.gather(1, idx)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C) multiplier: ``π_c(x)`` for the kept channels, 0 for the others."""
        idx, val = self.decide(x)
        return torch.zeros(val.shape[0], self.num_units, dtype=val.dtype, device=val.device).scatter(1, idx, val)

    def penalty(self) -> Tensor:
        """``weight · mean_b Σ_c π_bc`` of the last training forward (0 in eval or before any)."""
        if self._pi is None or not self.training:
            return self.fc.bias.new_zeros(())
        return self.weight * self._pi.sum(1).mean()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pi"] = None  # carries an autograd graph
        return state

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_units={self.num_units}, keep={self.keep}, weight={self.weight}"

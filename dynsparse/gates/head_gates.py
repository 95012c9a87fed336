"""Per-input attention-head gates: which heads of an attention layer run for this input.

``dejavu`` (`DejaVuHeadGate`, Liu et al. 2023, Deja Vu's head predictor): a low-rank linear predictor
``Linear(C → r) → Linear(r → H)`` (no bias, no activation) scores the ``H`` heads from the attention layer's input;
the ``⌊keep · H⌉`` best heads run, one set per input (sequence / image), scored on the mean token (exactly the mean
of the per-token scores: the predictor is linear). Every input keeps the same number of heads, so a batch can be
planned whole. ``keep`` is the run-time knob (`dynsparse.set_budget_`).

Training follows Deja Vu's reference code: labels are the top-k heads by the norm of each head's attention output
(here the per-input mean over tokens of ``‖softmax(q kᵀ / √d) v‖`` per head), the loss is the weighted BCE of
`dynsparse.gates.neuron_gates.DejaVuGate.loss`, the host stays frozen
(`dynsparse.layers.head_gating.train_head_predictors_`).
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from .neuron_gates import DejaVuGate

__all__ = ["HEAD_GATES", "DejaVuHeadGate", "head_labels"]

#: Registered per-input head gates: name -> class (constructor ``(num_units, dim=..., keep=..., **kwargs)``).
HEAD_GATES: Registry[type[DejaVuGate]] = Registry("per-input head gate")


@HEAD_GATES.register("dejavu")
class DejaVuHeadGate(DejaVuGate):
    """Deja Vu's head predictor: the best ``keep · H`` of ``num_units`` heads per input (see the module doc).

    Args:
        num_units: Heads H of the attention layer.
        dim: Input width C of the attention layer.
        keep: Fraction of heads kept per input, in (0, 1] (at least one head).
        per: ``"input"`` only (heads process whole sequences: one set per input).
        rank: Predictor rank r (default ``max(16, C // 8)``).

    Examples:
        >>> import torch
        >>> g = DejaVuHeadGate(4, dim=8, keep=0.5)
        >>> g(torch.randn(3, 5, 8)).sum(1).tolist()  # (B, H) bool: two heads per input
        [2, 2, 2]
    """

    pers = ("input",)

    def __init__(self, num_units: int, dim: int, keep: float = 0.5, per: str = "input", rank: int | None = None):
        if per != "input":
            raise ConfigError(f"DejaVuHeadGate: per must be 'input' (one head set per sequence / image), got {per!r}")
        super().__init__(num_units, dim, keep, per, rank)

    def where(self) -> str:
        return f"head gate of {self.owner!r}" if self.owner else type(self).__name__


def head_labels(norms: Tensor, keep: float) -> Tensor:
    """(B, H) bool labels: the ``⌊keep · H⌉`` heads (at least one) with the largest output norms ``norms`` (B, H)."""
    h = norms.shape[-1]
    k = max(1, min(h, round(keep * h)))
    return norms.new_zeros(norms.shape, dtype=bool).scatter_(-1, norms.topk(k, dim=-1).indices, True)

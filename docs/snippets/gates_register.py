import torch
from torch import nn

import dynsparse as ds


@ds.register_gate("magnitude")
class MagnitudeGate(ds.Gate):
    """Keeps units whose learned score is above a fixed threshold; straight-through in training."""

    def __init__(self, num_units, threshold=0.0, device=None, dtype=None):
        super().__init__(num_units)
        self.threshold = threshold
        self.scores = nn.Parameter(torch.ones(num_units, device=device, dtype=dtype))  # open by default

    def eval_values(self):
        return (self.scores > self.threshold).to(self.scores.dtype)

    def forward(self):
        hard = self.eval_values()
        return hard + self.scores - self.scores.detach() if self.training else hard

    def penalty(self):
        return self.scores.abs().sum()


print(ds.make_gate({"gate": "magnitude", "threshold": 0.5}, 3).eval()())
try:
    ds.register_gate("magnitude")(MagnitudeGate)
except ds.ConfigError as e:
    print(f"ConfigError: {e}")

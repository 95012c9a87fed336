import torch

import dynsparse as ds


class TokenNormGate(ds.InputDependentGate):
    """Keeps, per sample, the tokens with the largest L2 norm."""

    def forward(self, x):  # x: (B, N, C) -> (B, N) multiplier
        idx = x.norm(dim=-1).topk(self.num_kept(), dim=-1).indices
        return torch.zeros(x.shape[:2], dtype=x.dtype).scatter_(1, idx, 1.0)


torch.manual_seed(0)
g = TokenNormGate(6, keep=0.5)
print(g, g.num_kept())
print(g(torch.randn(2, 6, 4)))
print(g.set_budget_(1 / 3).num_kept())

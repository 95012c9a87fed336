import timm
import torch
from torch import nn

import dynsparse as ds


class TokenNormGate(ds.InputDependentGate):
    """Keeps, per sample, the tokens with the largest L2 norm."""

    def forward(self, x):  # x: (B, N, C) -> (B, N) multiplier
        idx = x.norm(dim=-1).topk(self.num_kept(), dim=-1).indices
        return torch.zeros(x.shape[:2], dtype=x.dtype).scatter_(1, idx, 1.0)


class TokenSkip(nn.Module):
    """Zeroes the tokens its gate drops."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        return x * self.gate(x).unsqueeze(-1)


torch.manual_seed(0)
model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
ds.sparsify_(model, {"neurons": "fixed"})
ds.fix_gates_(model, {f"blocks.{i}.mlp.norm": torch.rand(768) < 0.5 for i in range(3)})
model.norm_pre = TokenSkip(TokenNormGate(17, keep=0.5))  # 16 patches + the class token
x = torch.randn(2, 3, 32, 32)
try:
    ds.convert(model)
except ds.ConfigError as e:
    print(f"ConfigError: {e}")
small = ds.convert(model, static=False, verify_inputs=x)
print(small.norm_pre, small.blocks[0].mlp.fc1)
small.norm_pre.gate.set_budget_(0.25)  # still a run-time knob
print(small.norm_pre.gate.num_kept(), small(x).shape)

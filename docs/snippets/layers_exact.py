import torch
from timm.layers import Attention, Mlp

import dynsparse as ds
from dynsparse.layers import GatedAttention, GatedMlp

torch.manual_seed(0)
x = torch.randn(2, 5, 16, dtype=torch.float64)

# neurons: closing hidden units == an Mlp with fewer hidden_features
mlp = GatedMlp(16, 64).double().eval()
keep = torch.rand(64) < 0.5
ds.fix_gates_(mlp, {"norm.gate": keep})
small = Mlp(16, hidden_features=int(keep.sum())).double().eval()
with torch.no_grad():
    small.fc1.weight.copy_(mlp.fc1.weight[keep])
    small.fc1.bias.copy_(mlp.fc1.bias[keep])
    small.fc2.weight.copy_(mlp.fc2.weight[:, keep])
    small.fc2.bias.copy_(mlp.fc2.bias)
print(int(keep.sum()), (mlp(x) - small(x)).abs().max().item())

# heads: closing heads == an Attention with fewer heads of the same head_dim
attn = GatedAttention(16, num_heads=4, qkv_bias=True).double().eval()
heads = torch.tensor([True, False, True, False])
ds.fix_gates_(attn, {"norm": heads})  # the slot name works too
ch = heads.repeat_interleave(attn.head_dim)  # channels of the kept heads
small = Attention(16, num_heads=2, attn_head_dim=4, qkv_bias=True).double().eval()
with torch.no_grad():
    small.qkv.weight.copy_(attn.qkv.weight[ch.repeat(3)])
    small.qkv.bias.copy_(attn.qkv.bias[ch.repeat(3)])
    small.proj.weight.copy_(attn.proj.weight[:, ch])
    small.proj.bias.copy_(attn.proj.bias)
print((attn(x) - small(x)).abs().max().item())

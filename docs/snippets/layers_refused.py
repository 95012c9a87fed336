import timm
import torch
from timm.layers import Attention, Mlp
from timm.models._efficientnet_blocks import DepthwiseSeparableConv

import dynsparse as ds
from dynsparse.layers import GatedAttention, GatedBottleneck, GatedDepthwiseSeparableConv, GatedMlp

cases = [
    (GatedMlp, Mlp(8, 32, norm_layer=torch.nn.LayerNorm)),
    (GatedAttention, Attention(32, num_heads=4, scale_norm=True, norm_layer=torch.nn.LayerNorm)),
    (GatedBottleneck, timm.create_model("resnext50_32x4d", pretrained=False).layer1[0]),
    (GatedDepthwiseSeparableConv, DepthwiseSeparableConv(16, 16)),
    (GatedMlp, Attention(32)),
]
for cls, host in cases:
    try:
        cls.from_module(host, fqn="blocks.0.x")
    except ds.UnsupportedModuleError as e:
        print(f"{cls.__name__}: {e}")

import functools

import timm
import torch

import dynsparse as ds
from dynsparse.layers import GatedAttention, GatedMlp

kw = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10)
torch.manual_seed(0)
plain = timm.create_model("vit_tiny_patch16_224", **kw).eval()
gated = timm.create_model(
    "vit_tiny_patch16_224",
    mlp_layer=functools.partial(GatedMlp, gate="sigmoid"),  # mlp_layer may be a partial
    attn_layer=GatedAttention,  # attn_layer must be a class (timm calls issubclass on it)
    **kw,
).eval()
missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
print(missing, unexpected)
x = torch.randn(2, 3, 32, 32)
print(torch.equal(gated(x), plain(x)))
print([(n, type(g).__name__, g.num_units) for n, g in ds.named_gates(gated)][:2])

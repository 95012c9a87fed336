import copy
from collections import Counter

import timm
import torch

import dynsparse as ds
from dynsparse.layers import GateSlot

torch.set_num_threads(1)
torch.manual_seed(0)
tiny_vit = dict(img_size=32, patch_size=8, depth=2)
families = [  # (model, kwargs, dimensions)
    ("test_vit", {}, ("neurons", "heads", "layers")),
    ("test_vit2", {}, ("neurons", "heads", "layers")),  # LayerScale
    ("deit_tiny_distilled_patch16_224", tiny_vit, ("neurons", "heads", "layers")),  # distillation token
    ("vit_tiny_patch16_224", dict(tiny_vit, reg_tokens=4, no_embed_class=True), ("neurons", "heads", "layers")),
    ("test_resnet", {}, ("channels", "layers")),
    ("test_convnext", {}, ("neurons", "layers")),
    ("efficientnet_b0", {}, ("channels", "layers")),
    ("mobilenetv3_small_050", {}, ("channels", "layers")),
    (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        ("neurons", "layers"),
    ),
]
x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
for name, kwargs, dims in families:
    model = timm.create_model(name, pretrained=False, **kwargs).double().eval()
    ref = copy.deepcopy(model)
    ds.sparsify_(model, {d: "hard_concrete" for d in dims})
    counts = Counter(m.dimension for m in model.modules() if isinstance(m, GateSlot))
    diff = (model(x) - ref(x)).abs().max().item()
    print(f"{name:<32} { {d: counts[d] for d in ds.DIMENSIONS if d in counts} }  max |diff| {diff:.1e}")

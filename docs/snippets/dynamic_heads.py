import tempfile
from pathlib import Path

import timm
import torch

import dynsparse as ds
from dynsparse.layers.head_gating import set_head_strategy_, train_head_predictors_

torch.manual_seed(0)
torch.set_num_threads(1)

# a ViT whose attention layers each run 3 of their 6 heads per image, chosen by Deja Vu's head predictor
kw = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=6, num_classes=10)
arch = {"name": "vit_small_patch16_224", "kwargs": kw}
model = timm.create_model(arch["name"], pretrained=False, **kw).eval()
dense_flops = ds.flops.count_flops(model, torch.randn(1, 3, 32, 32))
ds.sparsify_(model, {"heads": {"gate": "dejavu", "keep": 0.5}})
print(model.blocks[0].attn.heads)
images = [torch.randn(16, 3, 32, 32) for _ in range(32)]  # use real images
recall = train_head_predictors_(model, images, epochs=10)  # labels: each image's top heads by output norm
print("held-out recall per layer (chance 0.5):", {k: round(v, 2) for k, v in recall.items()})

x = torch.randn(8, 3, 32, 32)
with torch.no_grad():
    sets = model.blocks[0].attn.heads(model.blocks[0].norm1(model.patch_embed(x)))
    print("head sets of 8 images in layer 0:", [r.nonzero().flatten().tolist() for r in sets])
    fast = model(x)  # one gathered run per group of images with the same heads
    set_head_strategy_(model, "mask")  # every head computed, the dropped ones zeroed: the reference
    print("gathered == masked:", torch.allclose(fast, model(x), atol=1e-5))
    set_head_strategy_(model, "auto")
    for keep in (1.0, 0.67, 0.5, 0.34):  # the run-time knob: heads kept per image
        with ds.budget(model, keep):
            share = ds.flops.count_flops(model, x[:1]) / dense_flops
            print(f"keep {keep}: {model.blocks[0].attn.heads.num_kept()} heads, {share:.1%} of the dense FLOPs")

small = ds.convert(model, static=False)  # the head gates stay run-time modules
print("plan:", small.slice_plan.dynamic["heads"])
with tempfile.TemporaryDirectory() as d:
    ds.save(small, Path(d) / "vit.safetensors", arch=arch)
    back = ds.load(Path(d) / "vit.safetensors")
with torch.no_grad():
    print("reloaded == original:", torch.equal(back(x), model(x)))

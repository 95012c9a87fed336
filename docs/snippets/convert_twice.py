import os
import tempfile

import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
os.chdir(tempfile.mkdtemp())
arch = {"name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 10}}
model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
x = torch.randn(2, 3, 32, 32)

small = model
for sparsity in ({"neurons": 0.5, "heads": 0.34}, {"neurons": 0.5}, {"neurons": 0.25, "heads": 0.5}):
    ds.prune.structured_(small, sparsity)  # gates the (converted) model again; fine-tune here
    small = ds.convert(small, verify_inputs=x)  # smaller again; its plan is relative to the host
    plan = small.slice_plan
    print(
        f"fc1 {small.blocks[0].mlp.fc1.out_features:3d} of {plan.units['blocks.0.mlp.norm']}, "
        f"heads {small.blocks[0].attn.num_heads} of {plan.units['blocks.0.attn.norm']}"
    )

loaded = ds.load(ds.save(small, "model.safetensors", arch=arch))
print("same plan:", loaded.slice_plan == plan, "same output:", torch.equal(loaded(x), small(x)))
print("host neurons kept by blocks.0:", plan.keep("blocks.0.mlp.norm")[:8], "...")

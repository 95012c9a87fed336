import os
import tempfile

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
os.chdir(tempfile.mkdtemp())
arch = {"name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "num_classes": 10}}
model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
ds.fix_gates_(model, {f"blocks.{i}.mlp.norm": torch.rand(768) < 0.5 for i in range(3)})
small = ds.convert(model)

try:  # without arch=, the spec is the bare timm name: it would rebuild the wrong shapes
    ds.save(small, "model.safetensors")
except ds.ConfigError as e:
    print(f"ConfigError: {e}")
ds.save(small, "model.safetensors", arch=arch)
with safe_open("model.safetensors", framework="pt") as f:
    meta = f.metadata()
print(sorted(meta), meta["arch"])

loaded = ds.load("model.safetensors")  # build host from arch, apply_plan, load the tensors
x = torch.randn(2, 3, 32, 32)
print("training:", loaded.training, "same plan:", loaded.slice_plan == small.slice_plan)
print("same output:", torch.equal(loaded(x), small(x)))

tensors = load_file("model.safetensors")  # a damaged file: one tensor with the wrong shape
tensors["blocks.1.mlp.fc1.weight"] = tensors["blocks.1.mlp.fc1.weight"][:-1]
save_file(tensors, "damaged.safetensors", metadata=meta)
try:
    ds.load("damaged.safetensors")
except ds.DynsparseError as e:
    print(f"DynsparseError: {e}")

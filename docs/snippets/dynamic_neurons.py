import copy
import tempfile
from pathlib import Path

import timm
import torch
from timm.layers import SwiGLU

import dynsparse as ds
from dynsparse.layers.neuron_gating import calibrate_neurons_, set_strategy_, train_predictors_

torch.manual_seed(0)
torch.set_num_threads(1)

# CATS on a decoder-style SwiGLU MLP: a threshold on |SiLU(fc1_g x)| calibrated so that half the activations survive
mlp = torch.nn.Sequential(SwiGLU(64, 176)).eval()
dense = copy.deepcopy(mlp)
ds.sparsify_(mlp, {"neurons": {"gate": "cats", "keep": 0.5}})
calib = [torch.randn(32, 1, 64) for _ in range(4)]  # use real hidden states
calibrate_neurons_(mlp, calib)
gate = mlp[0].neurons
print(gate)
kept = torch.cat([gate(mlp[0].gate_activation(x.reshape(-1, 64))).float().flatten() for x in calib]).mean()
print(f"kept on the calibration data: {kept:.3f}, threshold {gate.threshold.item():.4f}")
token = torch.randn(1, 1, 64)
with torch.no_grad():
    set_strategy_(mlp, "gather")  # the FLOP-minimal path, for counting
    for keep in (1.0, 0.7, 0.5, 0.3):  # the knob re-derives the threshold from the stored quantiles
        with ds.budget(mlp, keep):
            share = ds.flops.count_flops(mlp, token) / ds.flops.count_flops(dense, token)
            print(f"keep {keep:.1f}: threshold {gate.threshold.item():.4f}, {share:.1%} of the dense FLOPs")
    fast = mlp(token)
    set_strategy_(mlp, "mask")
    print("gathered == masked:", torch.allclose(fast, mlp(token), atol=1e-6))

# Deja Vu in a ViT: a low-rank predictor per MLP picks half of the neurons per image; train it, then save / load
kw = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
arch = {"name": "vit_small_patch16_224", "kwargs": kw}
model = timm.create_model(arch["name"], pretrained=False, **kw).eval()
ds.sparsify_(model, {"neurons": {"gate": "dejavu", "keep": 0.5, "per": "input"}})
images = [torch.randn(16, 3, 32, 32) for _ in range(32)]  # use real images
recall = train_predictors_(model, images, epochs=10)
print("held-out recall per MLP (chance 0.5):", {k: round(v, 2) for k, v in recall.items()})
x = torch.randn(2, 3, 32, 32)
small = ds.convert(model, static=False)
print("plan:", small.slice_plan.dynamic["neurons"])
with tempfile.TemporaryDirectory() as d:
    ds.save(small, Path(d) / "vit.safetensors", arch=arch)
    back = ds.load(Path(d) / "vit.safetensors")
with torch.no_grad():
    print("reloaded == original:", torch.equal(back(x), model(x)))

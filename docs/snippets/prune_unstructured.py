import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("test_vit", pretrained=False).eval()
x = torch.randn(2, 3, 32, 32)
ds.prune.unstructured_(model, sparsity=0.5, scope="global", exclude=["head", "patch_embed.*"])
print(type(model.blocks[0].mlp.fc1).__name__, "keys:", [k for k in model.state_dict() if "blocks.0.mlp.fc1" in k])
print(f"sparsity {ds.prune.sparsity(model).overall:.4f}")
ds.prune.unstructured_(model, sparsity=0.8)  # iterative: never revives a weight, reaches the total exactly
print(f"sparsity {ds.prune.sparsity(model).overall:.4f}")
y = model(x)
ds.prune.remove_(model)  # permanent: plain nn.Linear with zeros
print(type(model.blocks[0].mlp.fc1).__name__, torch.allclose(model(x), y))

# AGP (Zhu & Gupta 2017): cubic schedule, a pure function of the step
print([round(ds.prune.agp(t, initial=0.0, final=0.9, begin=0, end=100, frequency=10), 3) for t in range(0, 121, 20)])

# block sparsity with a measured fallback
lin = torch.nn.Linear(768, 3072)
bsl = ds.prune.BlockSparseLinear.from_linear(lin, block=32, sparsity=0.9)
print(bsl)

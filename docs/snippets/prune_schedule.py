import functools

import torch
import torch.nn.functional as F
from torch import nn

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
x, y = torch.randn(512, 64), torch.randint(0, 10, (512,))
# AGP (Zhu & Gupta 2017): 0 -> 90 % over steps 0..300, masks updated every 50 steps, layer-wise magnitude
schedule = functools.partial(ds.prune.agp, initial=0.0, final=0.9, begin=0, end=300, frequency=50)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
# optimizer=opt: masked raw weights are set back to 0 after every opt.step() (Adam's moments would move them)
pruner = ds.prune.IterativePruner(model, schedule, scope="layer", optimizer=opt)
for step in range(400):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if pruner.step(step + 1):  # prune after the update, when the target changed
        s = ds.prune.sparsity(model)
        layers = {k: round(v, 3) for k, v in s.layers.items()}
        print(f"step {step + 1:3d}: target {pruner.target:.3f}, per layer", layers)
masked = [(i, m) for i, m in enumerate(model) if hasattr(m, "weight_mask")]
print(
    f"final loss {loss.item():.3f}, raw weights under the masks all zero:",
    all(not m.weight[~m.weight_mask].any() for _, m in masked),
    "| in the state dict:",
    all(not model.state_dict()[f"{i}.weight"][~m.weight_mask].any() for i, m in masked),
)

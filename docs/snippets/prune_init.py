import copy

import torch
import torch.nn.functional as F

import dynsparse as ds
from dynsparse.data import load_dataset, make_loader
from dynsparse.importance import grasp, random, snip, synflow, unstructured_masks
from dynsparse.models import LeNet300100

torch.manual_seed(0)
torch.set_num_threads(1)
batch = next(iter(make_loader(load_dataset("mnist", "train"), 100, shuffle=True, seed=0)))  # (x, y), 100 images
model = LeNet300100()  # at initialisation: nothing trained yet
scores = {  # {param_fqn: scores shaped like the weight}, higher = keep
    "snip": snip(model, F.cross_entropy, batch),  # |w ⊙ ∂L/∂w| / Σ, one mini-batch
    "grasp": grasp(model, F.cross_entropy, batch, temperature=200.0),  # θ ⊙ Hg = GraSP's -S
    "synflow": synflow(model, (1, 28, 28), sparsity=0.98, iterations=100),  # data-free, 100 rounds
    "random": random(model, torch.Generator().manual_seed(0)),
}
for name, s in scores.items():
    masks = unstructured_masks(s, 0.98, scope="global")  # {param_fqn: bool keep mask}, exactly 98 % pruned
    pruned = ds.prune.apply_masks_(copy.deepcopy(model), masks)  # MaskedLinear twins, masked weights zeroed
    r = ds.prune.sparsity(pruned)
    kept = ", ".join(f"{k.split('.')[0]} {100 * (1 - v):.2f}%" for k, v in r.layers.items())
    print(f"{name:8s} pruned {100 * r.overall:.2f}%, kept per layer: {kept}")

# the same in one call; then train as usual: masked weights have no effect and get a zero gradient
ds.prune.unstructured_(model, 0.98, importance=scores["snip"], scope="global")
F.cross_entropy(model(batch[0]), batch[1]).backward()
print(
    type(model.fc1).__name__,
    "grad on pruned weights:",
    float(model.fc1.weight.grad[~model.fc1.weight_mask].abs().max()),
)

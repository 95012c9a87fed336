import torch
import torch.nn.functional as F
from torch import nn

import dynsparse as ds
from dynsparse.data import load_dataset

torch.manual_seed(0)
torch.set_num_threads(1)
train_x, train_y = load_dataset("digits", "train").tensors  # sklearn's 8x8 digits
test_x, test_y = load_dataset("digits", "test").tensors
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model, ticket):  # one training run; returns the test accuracy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # a fresh optimizer every round
    for step in range(1, 201):
        loss = F.cross_entropy(model(train_x), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ticket is not None:
            ticket.step(step)  # would save θ_k at step == rewind_step (late rewinding)
    with torch.no_grad():
        return round((model(test_x).argmax(-1) == test_y).float().mean().item(), 4)


# 4 rounds of train -> prune 50 % of the remaining weights per layer (output layer 20 %) -> reset to θ0
out = ds.prune.imp(model, train, rounds=4, rate=0.5, rates={"3": 0.2})
for r in out.rounds:
    print(f"round {r.round}: {1 - r.sparsity:.3f} of the weights left, test accuracy {r.result}")
print(out.ticket.sparsity().layers)

# control: the same masks with a fresh random init
out.ticket.reinit_(seed=1)
print("random re-init, same masks:", train(model, None))

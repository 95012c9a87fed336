import torch
import torch.nn.functional as F

import dynsparse as ds
from dynsparse.data import load_dataset, make_loader
from dynsparse.models import LeNet300100

torch.manual_seed(0)
torch.set_num_threads(1)
train, test = load_dataset("digits", "train"), load_dataset("digits", "test")  # scikit-learn's 8x8 digits
model = LeNet300100(img_size=8)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for epoch in range(10):
    for x, y in make_loader(train, 64, seed=epoch):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def accuracy(m):
    xs, ys = next(iter(make_loader(test, len(test), shuffle=False)))
    return (m(xs).argmax(-1) == ys).float().mean().item()


result = ds.prune.sensitivity(model, accuracy, ratios=[0.0, 0.5, 0.8, 0.9, 0.95, 0.99])  # model is not changed
print(result.table())
print("largest ratio per layer losing <= 1 point:", result.ratios_for(accuracy(model) - 0.01))
result.plot("/tmp/sensitivity_digits.png")

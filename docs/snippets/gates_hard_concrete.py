import torch

import dynsparse as ds

torch.manual_seed(0)
g = ds.HardConcreteGate(4)
print(g)
print(g.log_alpha)  # log(1 - 0.05) - log(0.05) = log 19
print(g.eval()())  # eval: deterministic, all open
print(g.keep_mask())
print(g.expected_keep())  # P(z > 0) per unit
print(g.penalty())  # expected L0 = sum of the above
g.train()
print(g())  # train: one stochastic draw per unit
print(g())

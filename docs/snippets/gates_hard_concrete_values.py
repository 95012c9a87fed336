import torch

import dynsparse as ds

g = ds.HardConcreteGate(4).eval()
with torch.no_grad():
    g.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 3.0]))
print(g.eval_values())  # clamp(sigmoid(log_alpha) * 1.2 - 0.1, 0, 1)
print(g.keep_mask())  # eval value > 0
print(g.expected_keep())  # sigmoid(log_alpha - beta * log(-gamma / zeta))

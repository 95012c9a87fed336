import torch

import dynsparse as ds

g = ds.SigmoidGate(4)
with torch.no_grad():
    g.logits.copy_(torch.tensor([-2.0, -0.5, 0.5, 3.0]))
z = g()  # training mode: hard 0/1 forward ...
print(z)
(z * torch.arange(1.0, 5.0)).sum().backward()
print(g.logits.grad)  # ... gradient of sigmoid(logit) backward
print(g.eval()(), g.penalty())

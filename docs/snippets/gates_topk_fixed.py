import torch

import dynsparse as ds

g = ds.TopKGate(6, keep=0.5)
print(g, g())  # scores start at 0: ties go to the lower index
with torch.no_grad():
    g.scores.copy_(torch.tensor([0.1, 0.9, -0.3, 0.5, 0.2, 0.7]))
print(g.keep_mask())
print(g.set_k_(k=2).keep_mask())
print(g.penalty())

f = ds.FixedGate(4, mask=torch.tensor([True, False, True, True]), values=torch.tensor([1.0, 1.0, 0.5, 2.0]))
print(f, f(), f.keep_mask())
print(sorted(f.state_dict()), list(f.parameters()))

import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
model = timm.create_model("test_vit", pretrained=False).eval()
x = torch.randn(2, 3, 160, 160)
before = model(x)

ds.sparsify_(model, {"neurons": "hard_concrete", "heads": "hard_concrete", "layers": "hard_concrete"})
print(torch.equal(model(x), before))  # every gate starts open
for name, gate in list(ds.named_gates(model))[:4]:
    print(name, type(gate).__name__, gate.num_units)
print(ds.penalty(model))
print(ds.sparsity_report(model))

import timm
import torch
import torch.nn.functional as F

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("test_vit", pretrained=False, num_classes=10)
ds.sparsify_(model, {"neurons": "hard_concrete", "heads": "hard_concrete", "layers": "hard_concrete"})

gate_params = [p for n, p in model.named_parameters() if ".gate." in n]
weights = [p for n, p in model.named_parameters() if ".gate." not in n]
opt = torch.optim.AdamW([{"params": weights, "lr": 1e-3}, {"params": gate_params, "lr": 0.1, "weight_decay": 0}])
n_units = sum(g.num_units for _, g in ds.named_gates(model))
x, y = torch.randn(8, 3, 160, 160), torch.randint(0, 10, (8,))

model.train()
for _ in range(60):
    loss = F.cross_entropy(model(x), y) + 2.0 * ds.penalty(model) / n_units
    opt.zero_grad()
    loss.backward()
    opt.step()
    for _, g in ds.named_gates(model):
        if isinstance(g, ds.HardConcreteGate):
            g.constrain_()  # clamp log_alpha, as the reference code does
print(f"expected L0: {ds.penalty(model).item():.1f} of {n_units}")

model.eval()
print(ds.sparsity_report(model))

ds.fix_gates_(model)  # freeze every gate to its current keep mask and eval values
# or to masks you choose: a key names a gate or its slot
ds.fix_gates_(model, {"blocks.0.attn.norm": torch.tensor([True, False]), "blocks.5.drop_path2": torch.tensor([False])})
print(type(model.blocks[0].attn.norm.gate).__name__, ds.penalty(model))
report = ds.sparsity_report(model)
print(report)
print(report.per_gate["blocks.0.attn.norm.gate"], report.per_gate["blocks.0.mlp.norm.gate"])

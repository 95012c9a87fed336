import tempfile

import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
arch = {"name": "resnet18", "kwargs": {"num_classes": 10}}
dense = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
with torch.no_grad():  # random weights: give every BatchNorm non-trivial values (timm zero-inits some)
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.3, 0.8), m.running_var.uniform_(0.5, 2.0)
model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
model.load_state_dict(dense.state_dict())
ds.sparsify_(model, {"channels": {"gate": "fbs", "keep": 0.5}})
print(model.layer1[0].gate)
x = torch.randn(4, 3, 96, 96) * torch.rand(4, 1, 1, 1) * 3  # images whose pooled features differ
with torch.no_grad():
    for keep in (1.0, 0.75, 0.5, 0.25):  # the run-time knob: no retraining
        with ds.budget(model, keep):
            frac = ds.flops.count_flops(model, x[:1]) / ds.flops.count_flops(dense, x[:1])
            print(f"keep {keep:.2f}: {frac:.1%} of the dense FLOPs")
    y = model(x)  # eval: per-input gathered convs
    one_by_one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    print("batch == one by one:", torch.allclose(y, one_by_one, atol=1e-4))
    blocks = [b for b in model.modules() if hasattr(b, "strategy")]  # the FBS blocks
    for b in blocks:
        b.strategy = "masked"  # dense convs with the same decisions masked: no saving, for checking
    print("gathered == masked:", torch.allclose(y, model(x), atol=1e-4))
    for b in blocks:
        b.strategy = "auto"
try:
    ds.convert(model)  # static=True: a fully static model cannot keep per-input gates
except ds.ConfigError as e:
    print(f"ConfigError: {e}")
small = ds.convert(model, static=False, verify_inputs=x)
print(small.slice_plan.dynamic["channels"]["gate"], small.slice_plan.dynamic["channels"]["keep"])
with tempfile.TemporaryDirectory() as d:
    ds.save(small, f"{d}/fbs.safetensors", arch=arch)
    back = ds.load(f"{d}/fbs.safetensors")
    with torch.no_grad():
        print("saved and loaded, same outputs:", torch.equal(back(x), small(x)))

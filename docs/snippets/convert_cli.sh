cd "$(mktemp -d)"
python - <<'PY'
import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
arch = {"name": "test_vit", "kwargs": {"num_classes": 10}}
model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])
ds.sparsify_(model, {"neurons": "hard_concrete", "heads": "hard_concrete", "layers": "hard_concrete"})
with torch.no_grad():  # stand-in for training
    for _, gate in ds.named_gates(model):
        gate.log_alpha.normal_(0.0, 3.0)
ds.fix_gates_(model, {"blocks.5.drop_path2": torch.tensor([False])})
ds.save_gated(model, "gated.safetensors", arch=arch, extra={"step": 1000})
again, info = ds.load_gated("gated.safetensors")
x = torch.randn(1, 3, 160, 160)
print(info, torch.equal(again.eval()(x), model.eval()(x)))
PY
dynsparse convert gated.safetensors --out converted
ls converted

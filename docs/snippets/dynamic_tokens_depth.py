import tempfile
from pathlib import Path

import timm
import torch

import dynsparse as ds
from dynsparse.gates import TokenGate

torch.manual_seed(0)
torch.set_num_threads(1)
arch = {"name": "vit_small_patch16_224", "kwargs": {"img_size": 64}}  # 16 patches + the class token
model = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
dense = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"]).eval()
dense.load_state_dict(model.state_dict())
# half of the tokens after block 3, and a router on each block after it
spec = {
    "tokens": {"gate": "cls_attention", "blocks": [3], "keep": 0.5},
    "depth": {"gate": "router", "blocks": list(range(4, 12)), "keep": 0.5},
}
ds.sparsify_(model, spec)
print([type(b).__name__ for b in model.blocks[2:6]])
with torch.no_grad():  # stand-in for training: routers that disagree across images
    for b in model.blocks[4:]:
        b.router.proj.weight.normal_(0, 0.5)
        b.router.proj.bias.fill_(0.5)
x = torch.randn(6, 3, 64, 64)
runs = []
hooks = [b.router.register_forward_hook(lambda m, a, out: runs.append(out.flatten())) for b in model.blocks[4:]]
with torch.no_grad():
    y = model(x)
for h in hooks:
    h.remove()
print("routed blocks run per image:", torch.stack(runs).sum(0).int().tolist(), "of 8")
with torch.no_grad():
    one_by_one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    print("batch == one by one:", torch.allclose(y, one_by_one, atol=1e-5))
    model.blocks[3].tokens.mask_inference = True  # the masked reference: same decisions, nothing gathered or skipped
    print("gathered and skipped == masked:", torch.allclose(y, model(x), atol=1e-5))
    model.blocks[3].tokens.mask_inference = False
    for keep in (1.0, 0.75, 0.5, 0.25):  # one knob for both parts
        with ds.budget(model, keep):
            flops = ds.flops.count_flops(model, x) / ds.flops.count_flops(dense, x)
            print(f"keep {keep:.2f}: {flops:.1%} of the dense FLOPs")
    with ds.budget(model, 1.0, kind=TokenGate):  # or one part only
        print(f"all tokens, routers at 0.5: {ds.flops.count_flops(model, x) / ds.flops.count_flops(dense, x):.1%}")
small = ds.convert(model, static=False, verify_inputs=x)
print(small.slice_plan.dynamic)
with tempfile.TemporaryDirectory() as d:
    ds.save(small, Path(d) / "vit.safetensors", arch=arch)
    back = ds.load(Path(d) / "vit.safetensors")
with torch.no_grad():
    print("saved and loaded:", type(back.blocks[5]).__name__, torch.allclose(back(x), y, atol=1e-5))

import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64).eval()  # 16 patches + class
dense = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64).eval()
dense.load_state_dict(model.state_dict())
# EViT's score (class-token attention), no training: keep half of the tokens after blocks 3 and 6
ds.sparsify_(model, {"tokens": {"gate": "cls_attention", "blocks": [3, 6], "keep": 0.5}})
print(model.blocks[3].tokens)
x = torch.randn(4, 3, 64, 64)
with torch.no_grad():
    for keep in (1.0, 0.75, 0.5, 0.25):  # the run-time knob: no retraining
        with ds.budget(model, keep):
            y = model(x)
            flops = ds.flops.count_flops(model, x) / ds.flops.count_flops(dense, x)
            print(f"keep {keep:.2f}: {flops:.1%} of the dense FLOPs, output {tuple(y.shape)}")
    # the fast path (gather) equals masked attention on the same decisions
    y_fast = model(x)
    for b in model.blocks:
        if hasattr(b, "tokens"):
            b.tokens.mask_inference = True
    print("gathered == masked:", torch.allclose(y_fast, model(x), atol=1e-5))

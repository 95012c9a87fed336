import timm
import torch

import dynsparse as ds
from dynsparse.layers.tokens import calibrate_tokens_

torch.manual_seed(0)
torch.set_num_threads(1)
kw = dict(pretrained=False, img_size=64, num_classes=10)  # 16 patches + class token
dense = timm.create_model("vit_small_patch16_224", **kw).eval()
model = timm.create_model("vit_small_patch16_224", **kw).eval()
model.load_state_dict(dense.state_dict())
# LTP: a learned threshold at blocks 3, 6, 9 (initialised to final_threshold * l / L)
ds.sparsify_(model, {"tokens": {"gate": "threshold", "blocks": [3, 6, 9], "final_threshold": 1.33}})
print(model.blocks[6].tokens.gate)


def images(n, seed):  # noise with a per-image contrast: the images keep different numbers of tokens
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g) * (2 * torch.rand(n, 1, 1, 1, generator=g))


def kept_per_image(m, x):  # tokens per image after the last gate (class token included)
    seen = []
    hook = m.blocks[9].register_forward_hook(lambda mod, a, out: seen.append(mod._token_state.packing.lengths))
    m(x)
    hook.remove()
    return seen[0]


x = images(6, 1)
with torch.no_grad():
    print("learned thresholds, tokens per image:", kept_per_image(model, x))
    # the batch (packed) gives what each image gives alone
    alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    print("batch == one by one:", torch.allclose(model(x), alone, atol=1e-5))
    calibrate_tokens_(model, images(32, 2))  # score quantiles per gate: keep fractions -> thresholds
    for keep in (1.0, 0.8, 0.6, 0.4):  # the run-time knob
        with ds.budget(model, keep):
            flops = ds.flops.count_flops(model, x) / ds.flops.count_flops(dense, x)
            print(f"keep {keep:.1f}: {flops:.1%} of the dense FLOPs, tokens per image {kept_per_image(model, x)}")
    print("keep None (learned thresholds) again:", ds.get_budget(model)["blocks.9.tokens.gate"])

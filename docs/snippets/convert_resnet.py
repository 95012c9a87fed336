import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("test_resnet", pretrained=False).eval()
with torch.no_grad():  # timm starts the last BN of each block at zero: give every BN random statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1)
ds.sparsify_(model, {"channels": "hard_concrete", "layers": "hard_concrete"})
with torch.no_grad():
    model.layer4[0].drop_path.gate.log_alpha.fill_(0.5)  # eval value 0.647: folded into bn2
ds.fix_gates_(
    model,
    {
        "layer1.0.drop_path": torch.tensor([False]),  # remove the branch (no downsample)
        "layer2.0.drop_path": torch.tensor([False]),  # remove the branch (with downsample)
        "layer3.0.act1": torch.zeros(48, dtype=torch.bool),  # keep none of conv1's channels
        "layer3.0.act2": torch.rand(48) < 0.5,  # keep about half of conv2's channels
    },
)
x = torch.randn(2, 3, 160, 160)
small = ds.convert(model, verify_inputs=x)
print("layer1.0 ->", small.layer1[0])
print("layer2.0 ->", small.layer2[0])
b = small.layer3[0]
print("layer3.0 convs:", [tuple(getattr(b, c).weight.shape) for c in ("conv1", "conv2", "conv3")])
print("layer3.0.conv2 weight all zero:", bool((b.conv2.weight == 0).all()))
scale = small.layer4[0].bn2.weight / model.layer4[0].bn2.weight
print(f"layer4.0.bn2 weight scaled by {scale.min():.4f} .. {scale.max():.4f}")
print(f"max-abs difference: {ds.verify(model, small, x):.2e}")

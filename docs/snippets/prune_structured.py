import copy

import timm
import torch

import dynsparse as ds
from dynsparse.flops import count_flops
from dynsparse.importance import MagnitudeImportance, TaylorImportance

torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(64, 1, 28, 28)
data = [(x[i : i + 16], torch.randint(0, 10, (16,))) for i in range(0, 64, 16)]  # calibration batches (x, y)
net = timm.create_model(
    "resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128), stem_width=16, zero_init_last=False
).eval()  # zero_init_last=True would make every channel's Taylor score 0 at init (bn2's scale is 0)

# channels: one gate per block between conv1 and conv2; keep the best half of each gate ("layer" scope)
for name, imp in [("L1 filter norm", MagnitudeImportance(p=1)), ("Taylor-FO", TaylorImportance(order=1))]:
    model = ds.prune.structured_(copy.deepcopy(net), {"channels": 0.5}, importance=imp, data=data, scope="layer")
    small = ds.convert(model)  # a plain timm ResNet with thinner blocks
    widths = [blk[0].conv1.out_channels for blk in (small.layer1, small.layer2, small.layer3, small.layer4)]
    same = torch.allclose(small.eval()(x), model(x), atol=1e-5)
    mflops = f"{count_flops(net, x[:1]) / 1e6:.2f} -> {count_flops(small, x[:1]) / 1e6:.2f}"
    print(f"{name}: widths {widths}, MFLOPs {mflops}, same output: {same}")

# global ranking across gates after per-gate l2 normalisation (Molchanov 2017), widths rounded to multiples of 4
model = ds.prune.structured_(copy.deepcopy(net), {"channels": 0.5}, scope="global", normalize="l2", round_to=4)
print("global + l2:", {fqn: int(g.keep_mask().sum()) for fqn, g in ds.named_gates(model)})

# transformers: MLP neurons and attention heads in one call; whole residual branches ("layers") by loss increase
vit = timm.create_model("test_vit", img_size=32).eval()
ds.prune.structured_(vit, {"neurons": 0.5, "heads": 0.5})
small_vit = ds.convert(vit)
blk = small_vit.blocks[0]
print(f"ViT block 0: fc1 {blk.mlp.fc1.in_features}->{blk.mlp.fc1.out_features}, heads {blk.attn.num_heads}")
vit_batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,)))]
vit = ds.prune.structured_(
    timm.create_model("test_vit", img_size=32), {"layers": 0.25}, importance="layer", data=vit_batches, scope="global"
)
print("closed branches:", [fqn for fqn, g in ds.named_gates(vit) if not bool(g.keep_mask().all())])

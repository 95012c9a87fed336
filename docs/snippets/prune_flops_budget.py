import copy

import timm
import torch

import dynsparse as ds
from dynsparse.flops import count_flops

torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(64, 1, 28, 28)
data = [(x[i : i + 16], torch.randint(0, 10, (16,))) for i in range(0, 64, 16)]
net = timm.create_model(
    "resnet10t", num_classes=10, in_chans=1, channels=(16, 32, 64, 128), stem_width=16, zero_init_last=False
).eval()
dense = count_flops(net, x[:1])
for imp, norm in [("magnitude", "l2"), ("taylor", "none"), ("random", "none")]:
    model = ds.prune.structured_(
        copy.deepcopy(net), ["channels"], importance=imp, data=data, flops=0.8, normalize=norm, max_sparsity=0.9
    )
    small = ds.convert(model)
    widths = [blk[0].conv1.out_channels for blk in (small.layer1, small.layer2, small.layer3, small.layer4)]
    print(f"{imp}: widths {widths}, kept FLOPs {count_flops(small, x[:1]) / dense:.4f}")

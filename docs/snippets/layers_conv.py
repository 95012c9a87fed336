import timm
import torch

from dynsparse.layers import GatedBasicBlock, GatedBottleneck

torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False).eval()
block = model.layer1[0]
gated = GatedBasicBlock.from_module(block).eval()
x = torch.randn(1, 64, 16, 16)
print(torch.equal(gated(x), block(x)))
print(gated.act1)

bottleneck = timm.create_model("resnet50", pretrained=False).layer1[0]
print([name for name, _ in GatedBottleneck.from_module(bottleneck).gate_slots()])

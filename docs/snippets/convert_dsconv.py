import timm
import torch
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
ds.sparsify_(model, {"channels": "fixed"})
print(type(model.blocks[0][0]).__name__, "gates", model.blocks[0][0].aa.gate.num_units, "input channels")
ds.fix_gates_(model, {"blocks.0.0.aa": torch.arange(32) % 4 != 0})  # close 8 of the stem's 32 output channels
with torch.no_grad():
    model.blocks[0][0].aa.gate.values.uniform_(0.5, 1.0)  # non-binary eval values: folded into conv_pw
x = torch.randn(2, 3, 32, 32)
small = ds.convert(model, verify_inputs=x)
b = small.blocks[0][0]
print("stem:", small.conv_stem.out_channels, "channels, bn1:", small.bn1.num_features, "features")
print("blocks.0.0: conv_dw groups", b.conv_dw.groups, "conv_pw", tuple(b.conv_pw.weight.shape))
print("plan producers:", small.slice_plan.producers)
print(f"max-abs difference: {ds.verify(model, small, x):.2e}")

# the producer of a DS block's input must be read by nothing else: here it is a block with a skip connection
net = EfficientNet(decode_arch_def([["ir_r2_k3_s1_e2_c16"], ["ds_r1_k3_s2_c24"]]), num_classes=10).eval()
ds.sparsify_(net, {"channels": "fixed"}, include="blocks.1.*")
ds.fix_gates_(net, {"blocks.1.0.aa": torch.arange(16) < 8})
try:
    ds.convert(net)
except ds.UnsupportedModuleError as e:
    print(f"UnsupportedModuleError: {e}")

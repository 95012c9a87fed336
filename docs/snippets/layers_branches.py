import timm
import torch

from dynsparse.layers import Branch, gate_branches_

torch.manual_seed(0)
vit = timm.create_model("test_vit", pretrained=False).eval()
block = vit.blocks[0]
x = torch.randn(1, 17, 64)
ref = block(x)
gate_branches_(
    block,
    [Branch("drop_path1", ("norm1", "attn", "ls1")), Branch("drop_path2", ("norm2", "mlp", "ls2"))],
    "hard_concrete",
)
print(block.drop_path1)
print(torch.equal(block(x), ref))

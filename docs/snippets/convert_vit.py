import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
ds.sparsify_(model, {"heads": "hard_concrete", "neurons": "hard_concrete", "layers": "hard_concrete"})
with torch.no_grad():  # stand-in for training: eval values of heads and neurons spread over [0, 1]
    for name, gate in ds.named_gates(model):
        if "drop_path" not in name:
            gate.log_alpha.normal_(-2.0, 2.0)
ds.fix_gates_(model)  # freeze every gate (non-binary eval values are kept)
ds.fix_gates_(
    model,
    {
        "blocks.0.attn.norm": torch.tensor([False, False, False]),  # keep none of the heads
        "blocks.1.drop_path1": torch.tensor([False]),  # remove block 1's attention branch
        "blocks.2.drop_path1": torch.tensor([False]),  # remove both branches of block 2
        "blocks.2.drop_path2": torch.tensor([False]),
    },
)
values = model.blocks[0].mlp.norm.gate.eval_values()
kept, between = int((values > 0).sum()), int(((values > 0) & (values < 1)).sum())
print(f"blocks.0.mlp: {kept} of {values.numel()} neurons kept, {between} of them with a value in (0, 1)")

x = torch.randn(2, 3, 32, 32)
small = ds.convert(model, verify_inputs=x)  # raises if outputs differ by more than atol + rtol * |ref|
print(type(small).__name__, "training:", small.training, "plan entries:", len(small.slice_plan.entries))
print("libraries:", sorted({type(m).__module__.split(".")[0] for m in small.modules()}))
print("dynsparse classes:", sorted({type(m).__name__ for m in small.modules() if type(m).__module__.startswith("dyn")}))
for i, block in enumerate(small.blocks):
    if isinstance(block, torch.nn.Identity):
        print(f"blocks.{i}: Identity")
        continue
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, ds.ZeroBranch):
        heads = f"ZeroBranch, norm1 {type(block.norm1).__name__}"
    else:
        heads = f"num_heads={attn.num_heads} head_dim={attn.head_dim} attn_dim={attn.attn_dim}"
    print(f"blocks.{i}: attn {heads}; mlp fc1 {tuple(mlp.fc1.weight.shape)} fc2 {tuple(mlp.fc2.weight.shape)}")
print("blocks.0.attn.proj.weight all zero:", bool((small.blocks[0].attn.proj.weight == 0).all()))
print(f"max-abs difference: {ds.verify(model, small, x):.2e}")
dense = sum(p.numel() for name, p in model.named_parameters() if ".gate." not in name)
print(f"parameters: {dense:,} -> {sum(p.numel() for p in small.parameters()):,}")

import tempfile

import torch
from transformers import ViTConfig, ViTForImageClassification
from transformers.utils import logging

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
logging.disable_progress_bar()
config = ViTConfig(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=128,
    num_hidden_layers=3,
    num_labels=10,
)
model = ViTForImageClassification(config).eval()
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
g = torch.Generator().manual_seed(3)
ds.fix_gates_(model, {f: torch.rand(gt.num_units, generator=g) < 0.5 for f, gt in ds.named_gates(model)})

small = ds.convert(model, uniform=True)
print(
    f"config: heads {small.config.num_attention_heads}, head_dim {small.config.head_dim}, "
    f"intermediate {small.config.intermediate_size}"
)
with tempfile.TemporaryDirectory() as tmp:
    small.save_pretrained(tmp)
    reloaded = ViTForImageClassification.from_pretrained(tmp).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    print("from_pretrained gives the same logits:", torch.equal(reloaded(x).logits, small(x).logits))
dense = sum(p.numel() for n, p in model.named_parameters())
print(f"parameters: {dense:,} -> {sum(p.numel() for p in small.parameters()):,}")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT2LMHeadModel(
    GPT2Config(vocab_size=100, n_embd=64, n_head=4, n_layer=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
).eval()
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
g = torch.Generator().manual_seed(2)
masks = {f: torch.rand(gt.num_units, generator=g) < 0.6 for f, gt in ds.named_gates(model) if gt.num_units > 1}
masks["transformer.h.0.attn.c_proj.gate_out"] = torch.tensor([False])  # remove layer 0's attention branch
ds.fix_gates_(model, masks)

small = ds.convert(model)
for i, block in enumerate(small.transformer.h):
    attn = block.attn
    if hasattr(attn, "c_attn"):
        what = f"{attn.num_heads} heads, c_attn {tuple(attn.c_attn.weight.shape)}, KV-cache entry {attn.layer_idx}"
    else:
        what = "removed"
    print(f"h.{i}: attention {what}; mlp c_fc {tuple(block.mlp.c_fc.weight.shape)}")

ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
kw = dict(attention_mask=(ids != 0).long(), max_new_tokens=5, do_sample=False, pad_token_id=0)
with torch.no_grad():
    print("same greedy tokens as the gated model:", torch.equal(small.generate(ids, **kw), model.generate(ids, **kw)))

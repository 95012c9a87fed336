import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
logging.disable_progress_bar()
config = LlamaConfig(
    vocab_size=100,
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=3,
    pad_token_id=0,
)
model = LlamaForCausalLM(config).eval()
ds.sparsify_(model, {"width": "hard_concrete", "heads": "fixed", "neurons": "fixed"})
print("width gate:", [name for name, _ in ds.named_gates(model) if name.startswith("width")])
print("a gated norm:", type(model.model.layers[0].input_layernorm).__name__)

with torch.no_grad():  # stand-in for training: eval values of the width gate spread over [0, 1]
    model.width.gate.log_alpha.normal_(0.0, 2.0)
ds.fix_gates_(model)
g = torch.Generator().manual_seed(1)
ds.fix_gates_(
    model, {f: torch.rand(gt.num_units, generator=g) < 0.7 for f, gt in ds.named_gates(model) if "width" not in f}
)
kept = int(model.width.gate.keep_mask().sum())
print(f"stream channels kept: {kept} of {model.width.gate.num_units}")

ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
mask = (ids != 0).long()
small = ds.convert(model, uniform=True, verify_inputs=(ids, mask))
print(
    f"config: hidden_size {small.config.hidden_size}, heads {small.config.num_attention_heads}, "
    f"head_dim {small.config.head_dim}, intermediate {small.config.intermediate_size}"
)
print(
    "embed_tokens:",
    tuple(small.model.embed_tokens.weight.shape),
    "q_proj:",
    tuple(small.model.layers[0].self_attn.q_proj.weight.shape),
)
with tempfile.TemporaryDirectory() as tmp:
    small.save_pretrained(tmp)
    reloaded = LlamaForCausalLM.from_pretrained(tmp).eval()
kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
with torch.no_grad():
    print("reloaded generates the same tokens:", torch.equal(reloaded.generate(ids, **kw), small.generate(ids, **kw)))
dense = sum(p.numel() for n, p in model.named_parameters() if ".gate." not in f".{n}")
print(f"parameters: {dense:,} -> {sum(p.numel() for p in small.parameters()):,}")

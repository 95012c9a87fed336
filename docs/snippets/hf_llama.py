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
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed"})
gate = model.model.layers[0].self_attn.o_proj.gate_in
print(f"heads gate: {gate.gate.num_units} units (one per key/value group) of {gate.unit_size} channels each")

g = torch.Generator().manual_seed(1)
ds.fix_gates_(model, {f: torch.rand(gt.num_units, generator=g) < 0.6 for f, gt in ds.named_gates(model)})
for word, key in (("heads", "self_attn"), ("neurons", "mlp")):
    print(f"{word} kept per layer:", [int(gt.keep_mask().sum()) for f, gt in ds.named_gates(model) if key in f])

# uniform=True: every layer keeps the mean count (its best units), so the config can describe the model
small = ds.convert(model, uniform=True)
c = small.config
print(
    f"config: heads {c.num_attention_heads}, kv heads {c.num_key_value_heads}, head_dim {c.head_dim}, "
    f"intermediate {c.intermediate_size}"
)
with tempfile.TemporaryDirectory() as tmp:
    small.save_pretrained(tmp)
    reloaded = LlamaForCausalLM.from_pretrained(tmp).eval()  # stock transformers

ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # left padding
mask = (ids != 0).long()
kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
with torch.no_grad():
    a, b = small.generate(ids, **kw), reloaded.generate(ids, **kw)  # greedy, with the KV cache
print("reloaded generates the same tokens:", torch.equal(a, b))
print(a[:, 6:].tolist())

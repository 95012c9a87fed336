import torch
from transformers import BertConfig, BertModel

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
config = BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3)
model = BertModel(config).eval()  # from_pretrained(...) works the same way
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
for name, gate in list(ds.named_gates(model))[:4]:
    print(f"{name}: {gate.num_units} unit(s)")

# stand-in for training: random keep masks; layer 1 loses its attention branch
g = torch.Generator().manual_seed(1)
masks = {f: torch.rand(gate.num_units, generator=g) < 0.6 for f, gate in ds.named_gates(model) if gate.num_units > 1}
masks["encoder.layer.1.attention.output.dense.gate_out"] = torch.tensor([False])
ds.fix_gates_(model, masks)

ids = torch.randint(3, 100, (2, 12))
mask = torch.ones_like(ids)
mask[1, 7:] = 0  # padding in the batch
small = ds.convert(model)
with torch.no_grad():
    diff = small(ids, attention_mask=mask).last_hidden_state - model(ids, attention_mask=mask).last_hidden_state
print(type(small).__name__, f"max-abs difference {diff.abs().max():.1e}")
for i, layer in enumerate(small.encoder.layer):
    att = layer.attention.self
    heads = att.num_attention_heads if hasattr(att, "num_attention_heads") else type(att).__name__
    print(f"layer {i}: heads {heads}, intermediate {layer.intermediate.dense.out_features}")

path = ds.save(small, "/tmp/bert_small.safetensors")  # dense config + slice plan + weights, no pickle
again = ds.load(path)
with torch.no_grad():
    a, b = again(ids, attention_mask=mask), small(ids, attention_mask=mask)
print("ds.load gives the same outputs:", torch.equal(a.last_hidden_state, b.last_hidden_state))

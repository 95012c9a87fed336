import torch
from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

import dynsparse as ds

torch.set_num_threads(1)
distil = DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_heads=4, hidden_dim=64, n_layers=2))
for dim in ("heads", "layers"):
    try:
        ds.sparsify_(distil, {dim: "fixed"})
    except ds.UnsupportedModuleError as e:
        print(e)

bert = BertModel(
    BertConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)
).eval()
ds.sparsify_(bert, {"heads": "fixed"})
ds.fix_gates_(bert, {f: torch.tensor([True, False, True, True]) for f, _ in ds.named_gates(bert)})
try:
    ds.convert(bert, uniform=True)
except ds.ConfigError as e:
    print(e)

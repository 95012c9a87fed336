import torch

import dynsparse as ds

print(ds.GATES.names())
print(ds.make_gate("sigmoid", 8))
print(ds.make_gate({"gate": "topk", "keep": 0.25}, 8))
print(ds.make_gate("hard_concrete", 8, dtype=torch.float64).log_alpha.dtype)
for bad in ("hard_concret", {"gate": "topk", "kk": 2}):
    try:
        ds.make_gate(bad, 8)
    except ds.ConfigError as e:
        print(f"ConfigError: {e}")

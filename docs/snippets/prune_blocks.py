import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
w = torch.randn(8, 8)
print("4x4 blocks, 50 % removed (L1 of each block):")
print(ds.prune.block_mask(w, block=4, sparsity=0.5).int())
print("2:4 along each row (the 2 largest |w| of every 4):")
print(ds.prune.nm_mask(w[:2], n=2, m=4).int())

lin = torch.nn.Linear(768, 3072)
for s in (0.5, 0.9):  # the kernel is chosen by a measurement on this machine, per layer
    bsl = ds.prune.BlockSparseLinear.from_linear(lin, block=32, sparsity=s)
    x = torch.randn(197, 768)
    ref = torch.nn.functional.linear(x, bsl.weight, bsl.bias)
    print(f"sparsity {s}: mode {bsl.mode}, max-abs difference to dense {(bsl(x) - ref).abs().max():.2e}")

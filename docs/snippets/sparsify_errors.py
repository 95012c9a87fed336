import logging

import timm

import dynsparse as ds

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
swin = timm.create_model(
    "swin_tiny_patch4_window7_224",
    pretrained=False,
    img_size=32,
    window_size=4,
    embed_dim=16,
    depths=(1, 1),
    num_heads=(1, 2),
)
for bad in ({"neuron": "hard_concrete"}, {"heads": "hard_concrete", "neurons": "hard_concrete"}):
    try:
        ds.sparsify_(swin, bad)
    except ds.DynsparseError as e:
        print(f"{type(e).__name__}: {e}")
ds.sparsify_(swin, {"heads": "hard_concrete", "neurons": "hard_concrete"}, on_unsupported="skip")
print([name for name, _ in ds.named_gates(swin)])

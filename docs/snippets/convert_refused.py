import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
cases = [  # (model, sparsify spec, gates to fix: slot fqn -> keep mask)
    (  # a branch value of 0.5 before squeeze-excite: SE(0.5 * x) is not 0.5 * SE(x)
        timm.create_model("test_resnet", pretrained=False, block_args={"attn_layer": "se"}),
        {"layers": {"gate": "hard_concrete", "include": "layer1.0"}},
        {},
    ),
]
for model, spec, masks in cases:
    ds.sparsify_(model, spec)
    ds.fix_gates_(model, masks)
    if not masks:
        with torch.no_grad():
            model.layer1[0].drop_path.gate.log_alpha.fill_(0.0)  # eval value 0.5
    try:
        ds.convert(model)
    except ds.UnsupportedModuleError as e:
        print(f"UnsupportedModuleError: {e}")

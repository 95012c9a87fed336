import timm

import dynsparse as ds

model = timm.create_model("test_vit", pretrained=False)
spec = {
    "neurons": {"gate": "hard_concrete", "init_std": 0.01},  # gate kwargs next to the gate name
    "heads": "sigmoid",  # shorthand for {"gate": "sigmoid"}
    "layers": {"gate": "hard_concrete", "include": ["blocks.4", "blocks.5"]},
}
plan = ds.plan_sparsify(model, spec, exclude="blocks.0.*")
print(plan.targets)
print(plan.gate_specs)
print(plan.skipped)

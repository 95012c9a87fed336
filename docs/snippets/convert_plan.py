import textwrap

import timm
import torch

import dynsparse as ds

torch.manual_seed(0)
torch.set_num_threads(1)
kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, mlp_ratio=0.25, num_classes=10)
model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs).eval()
ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
ds.fix_gates_(
    model,
    {
        "blocks.0.attn.norm": torch.tensor([True, False, True]),
        "blocks.0.mlp.norm": torch.rand(12) < 0.5,
        "blocks.1.mlp.norm": torch.zeros(12, dtype=torch.bool),  # keep none
        "blocks.1.drop_path1": torch.tensor([False]),  # branch removed
    },
)
small = ds.convert(model)
plan = small.slice_plan
print(plan == ds.make_plan(model))  # make_plan reads the gates without converting
print(textwrap.fill(plan.to_json().replace(",", ", "), 100))

# replay the plan on a fresh host of the same architecture, then load the converted weights
text = plan.to_json()
fresh = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs)
fresh = ds.apply_plan(fresh, ds.SlicePlan.from_json(text))
fresh.load_state_dict(small.state_dict())
x = torch.randn(2, 3, 32, 32)
print(torch.equal(fresh.eval()(x), small(x)))

# a plan checks the unit counts of the model it is applied to
other = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
try:
    ds.apply_plan(other, plan)
except ds.ConfigError as e:
    print(f"ConfigError: {e}")

"""Finish a recipe run that stopped at conversion because blocks.0.0 (DepthwiseSeparableConv) had closed channels.

Usage: python pretrained_finish_run.py RECIPE OUT_DIR [KEY=VALUE overrides of the run]. Nothing is trained again.

The gate of blocks.0.0 sits right before conv_pw (SE and aa are Identity in EfficientNet-Lite), so closing a
channel there equals zeroing that input column of conv_pw: fold the gate's eval multipliers into conv_pw, open
the gate (value 1), then convert as the recipe does. The model's function is unchanged (the converter's own
output check verifies it); the block's depthwise channels simply stay physically present.
"""

import copy
import sys

import torch

import dynsparse.recipes.run as run
from dynsparse.gates import FixedGate
from dynsparse.recipes.loader import load_recipe

torch.set_num_threads(1)
_convert = run.convert


def fold_block0(model):
    model = copy.deepcopy(model)
    blk = model.blocks[0][0]
    gate = blk.aa.gate  # the GateSlot in the aa slot, a FixedGate after the fine-tuning stage (fix_gates)
    assert isinstance(gate, FixedGate), type(gate)
    assert isinstance(blk.se, torch.nn.Identity)
    v = gate.eval_values()
    print(f"blocks.0.0: {int((v == 0).sum())} of {v.numel()} channels closed; folded into conv_pw", flush=True)
    with torch.no_grad():
        blk.conv_pw.weight.mul_(v.view(1, -1, 1, 1))
        gate.mask.fill_(True)
        gate.values.fill_(1.0)
    return model


def convert(model, **kw):
    return _convert(fold_block0(model), **kw)


run.convert = convert
recipe = load_recipe(sys.argv[1], overrides=sys.argv[3:])
run.run_recipe(recipe, sys.argv[2], resume=True, progress=False)

"""FLOPs accounting of Hugging Face gates: each gate's kept fraction scales the FLOPs it really removes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.flops import CostModel, count_flops  # noqa: E402

torch.set_num_threads(1)


def _models():
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2)
    yield "bert", transformers.BertModel(transformers.BertConfig(vocab_size=61, **small), add_pooling_layer=False)
    cfg = transformers.LlamaConfig(vocab_size=61, num_key_value_heads=2, **small)
    yield "llama", transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_cost_model_matches_counted_flops_of_the_converted_model(name):
    """Kept fraction predicted from the gates == FLOPs of the converted model counted by torch / dense FLOPs."""
    model = dict(_models())[name].eval()
    x = torch.randint(3, 61, (1, 12))
    dense = count_flops(model, (x,))
    ds.sparsify_(model, {"heads": "fixed", "neurons": "fixed", "layers": "fixed"})
    g = torch.Generator().manual_seed(1)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if gate.num_units > 1:
            m = torch.rand(gate.num_units, generator=g) < 0.5
            m[0] = True
            masks[fqn] = m
    masks[next(f for f, gt in ds.named_gates(model) if gt.num_units == 1)] = torch.tensor([False])
    ds.fix_gates_(model, masks)
    cost = CostModel(model, example_input=(x,))
    predicted = cost.fraction()
    converted = ds.convert(model, verify_inputs=(x,))
    measured = count_flops(converted, (x,)) / dense
    assert predicted == pytest.approx(measured, abs=0.02), (predicted, measured)

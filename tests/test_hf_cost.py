"""FLOPs accounting of Hugging Face gates: each gate's kept fraction scales the FLOPs it really removes."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.flops import CostModel, count_flops  # noqa: E402

torch.set_num_threads(1)

ALL = ("heads", "neurons", "layers", "width")
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=48, num_hidden_layers=2)


def _bert():
    model = transformers.BertModel(transformers.BertConfig(vocab_size=61, **SMALL), add_pooling_layer=False)
    return model, torch.randint(3, 61, (1, 12))


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=61, num_key_value_heads=2, **SMALL)
    return transformers.LlamaForCausalLM(cfg), torch.randint(3, 61, (1, 12))


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_head=4, n_inner=48, n_layer=2)
    return transformers.GPT2LMHeadModel(cfg), torch.randint(3, 61, (1, 12))


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **SMALL)
    return transformers.ViTForImageClassification(cfg), torch.randn(1, 3, 16, 16)


MODELS = {"bert": _bert, "llama": _llama, "gpt2": _gpt2, "vit": _vit}


def _random_masks_(model: torch.nn.Module, seed: int) -> None:
    """Random keep masks (never keep-none; one residual branch removed) fixed into every gate."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        if gate.num_units > 1:
            m = torch.rand(gate.num_units, generator=g) < 0.5
            m[0] = True
            masks[fqn] = m
    masks[next(f for f, gt in ds.named_gates(model) if gt.num_units == 1)] = torch.tensor([False])
    ds.fix_gates_(model, masks)


@pytest.mark.parametrize("dims", [ALL, ALL[:3]], ids=["width", "no-width"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cost_model_matches_counted_flops_of_the_converted_model(name, dims):
    """Kept fraction predicted from the gates == FLOPs of the converted model counted by torch / dense FLOPs.

    With a ``width`` gate every module's FLOPs scale with the kept width except the attention kernel (q·k and
    attention·v), which runs over the kept heads' channels.
    """
    torch.manual_seed(0)
    model, x = MODELS[name]()
    model.eval()
    dense = count_flops(model, (x,))
    ds.sparsify_(model, {d: "fixed" for d in dims})
    _random_masks_(model, seed=1)
    assert ("width" in dims) == any(f == "width.gate" for f, _ in ds.named_gates(model))
    cost = CostModel(model, example_input=(x,))
    assert cost.total == pytest.approx(dense)
    converted = ds.convert(model, verify_inputs=None if "width" in dims else (x,))
    measured = count_flops(converted, (x,)) / dense
    assert cost.fraction() == pytest.approx(measured, rel=1e-6), (cost.fraction(), measured)
    assert cost.fraction() < 0.9

"""Smoke tests of ``benchmarks/minilm_compress.py`` on a tiny random BERT (the real run is in docs/results_minilm.md).

Checked: the FLOPs attribution of the script equals the FLOPs counted on the converted model, and the pipeline
(gate training under the FLOPs Lagrangian -> enforce -> fix -> convert -> distillation fine-tune -> embeddings)
runs and keeps the target.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.flops import CostModel  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
DIMS = ("heads", "neurons", "layers", "width")


def _load():
    spec = importlib.util.spec_from_file_location("_bench_minilm_compress", BENCH / "minilm_compress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bert(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=layers
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _example(n: int = 16):
    ids = torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones_like(ids)


def test_attributed_flops_equal_counted_flops_of_the_converted_model():
    bench = _load()
    model, example = _bert(), _example()
    ds.sparsify_(model, {d: "fixed" for d in DIMS})
    g = torch.Generator().manual_seed(2)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        m = torch.rand(gate.num_units, generator=g) < 0.6
        m[0] = True  # no keep-none (it keeps one zeroed unit)
        masks[fqn] = m
    masks["encoder.layer.1.attention.output.dense.gate_out.gate"] = torch.tensor([False])  # a removed branch
    ds.fix_gates_(model, masks)
    cost = bench.attribute_bert_flops_(CostModel(model, example), model, example)
    dense = bench.count_flops(_bert(), *example)
    assert cost.total == pytest.approx(dense)
    counted = bench.count_flops(ds.convert(model), *example) / dense
    assert cost.fraction() == pytest.approx(counted, rel=1e-6), (cost.fraction(), counted)


@pytest.mark.parametrize("dims", [DIMS, DIMS[:3], ("width",), ("heads", "width")])
@pytest.mark.parametrize("gate", ["fixed", "hard_concrete"])
def test_library_cost_model_equals_the_recorded_attribution(dims, gate):
    """``make_budget`` (the library's CostModel) has exactly the terms of the script's attribution of the recorded
    runs, so their kept fractions (and expected fractions, hence the training) are identical bit for bit."""
    bench = _load()
    model, example = _bert(), _example()
    ds.sparsify_(model, {d: gate for d in dims})
    budget = bench.make_budget(model, 0.5, 2, example)
    ref = bench.attribute_bert_flops_(CostModel(model, example), model, example)
    assert [f for f, _ in budget.cost.slots] == [f for f, _ in ref.slots]
    assert budget.cost.terms == ref.terms
    assert budget.cost.total == ref.total
    assert budget.cost.fraction() == ref.fraction()
    assert torch.equal(budget.cost.expected_fraction(), ref.expected_fraction())


def test_pipeline_keeps_the_target_and_converts_exactly():
    bench = _load()
    teacher, example = _bert(2), _example()
    student = copy.deepcopy(teacher)
    ds.sparsify_(student, {d: "hard_concrete" for d in DIMS})
    seqs = [list(torch.randint(3, 100, (n,)).tolist()) for n in (5, 7, 9, 11, 6, 8, 10, 12)]
    data = bench.batches(seqs, 4)
    kw = dict(target=0.5, warmup=2, lr=1e-3, gate_lr=0.05, lambda_lr=0.05, w_tok=1.0, refill=True)
    budget = bench.train_gates(teacher, student, data, 3, example=example, **kw)
    assert budget.cost.fraction() <= 0.5 + 1e-9
    ds.fix_gates_(student)
    keep = bench.width_keep(student)
    small = ds.convert(student)
    ids, mask = bench.collate(seqs[:3])
    with torch.no_grad():
        a = bench.expand(small(input_ids=ids, attention_mask=mask).last_hidden_state, keep, 32)
        b = student(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bench.count_flops(small, *example) / bench.count_flops(teacher, *example) == pytest.approx(
        budget.cost.fraction(), rel=1e-6
    )
    bench.finetune(teacher, small, data, 2, keep=keep, lr=1e-3, w_tok=1.0, name="test")
    emb = bench.encode(small, seqs, keep, 32)
    assert emb.shape == (len(seqs), 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(seqs)), atol=1e-5)

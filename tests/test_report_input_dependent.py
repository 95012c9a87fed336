"""`sparsity_report` on models with input-dependent gates: listed with their budgets, FLOPs measured as they decide
(they used to be left out: the report showed the gated run's FLOPs as "dense" and 100 % kept)."""

from __future__ import annotations

import timm
import torch

import dynsparse as ds
from dynsparse.flops import count_flops

torch.set_num_threads(1)


def _vit(spec):
    torch.manual_seed(0)
    return ds.sparsify_(timm.create_model("test_vit", pretrained=False, img_size=32), spec).eval()


def test_token_gates_are_reported_per_input_with_measured_flops():
    m = _vit({"tokens": {"blocks": [0], "keep": 0.3}})
    x = torch.randn(2, 3, 32, 32)
    report = ds.sparsity_report(m, x)
    with ds.budget(m, 1.0):
        dense = count_flops(m, x)
    assert report.dense_flops == dense
    assert report.kept_flops == count_flops(m, x) < 0.8 * dense
    assert ds.get_budget(m) == {"blocks.0.tokens.gate": 0.3}, "the report must leave the budget as it was"
    (row,) = report.input_dependent
    assert (row.dimension, row.gates, row.keeps) == ("tokens", 1, (0.3,))
    assert report.per_input_gate == {"blocks.0.tokens.gate": 0.3} and not report.rows
    text = str(report)
    assert "per input, budget keep 0.3" in text and "input-dependent gates as they decided" in text
    assert f"({100 * report.flops_keep_ratio:.1f}%" in text and report.flops_keep_ratio < 0.8


def test_static_and_input_dependent_gates_combine():
    m = _vit({"neurons": "fixed", "tokens": {"blocks": [0], "keep": 0.5}})
    x = torch.randn(2, 3, 32, 32)
    closed = {f: torch.arange(g.num_units) % 2 == 0 for f, g in ds.named_gates(m) if f.endswith("mlp.norm.gate")}
    ds.fix_gates_(m, closed)
    report = ds.sparsity_report(m, x)
    static = ds.sparsity_report(_vit({"neurons": "fixed"}), x)
    assert [r.dimension for r in report.rows] == ["neurons"] and report.rows[0].keep_ratio == 0.5
    assert [r.dimension for r in report.input_dependent] == ["tokens"]
    cost = ds.flops.CostModel(m, x)
    assert abs(report.kept_flops - cost.fraction() * count_flops(m, x)) < 1e-6 * report.kept_flops
    assert report.flops_keep_ratio < 1.0 and static.flops_keep_ratio == 1.0
    assert "static gates from their keep masks, input-dependent gates" in str(report)


def test_fbs_channel_gates_are_reported_per_input():
    torch.manual_seed(0)
    m = ds.sparsify_(timm.create_model("test_resnet", pretrained=False), {"channels": {"gate": "fbs", "keep": 0.5}})
    report = ds.sparsity_report(m.eval(), torch.randn(2, 3, 32, 32))
    assert [(r.dimension, r.keeps) for r in report.input_dependent] == [("channels", (0.5,))]
    assert report.flops_keep_ratio < 0.9

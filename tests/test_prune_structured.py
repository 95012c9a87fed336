"""ds.prune.structured_: scores -> keep masks -> fixed gates -> convert."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds

torch.set_num_threads(1)
X = torch.randn(2, 3, 32, 32)


def _kept(model, dim):
    rows = {r.dimension: r for r in ds.sparsity_report(model).rows}
    return rows[dim]


def test_layer_scope_prunes_each_gate_exactly_and_converts():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet").eval()
    ds.prune.structured_(m, {"channels": 0.5})
    for fqn, g in ds.named_gates(m):
        assert isinstance(g, ds.FixedGate) and int(g.keep_mask().sum()) == g.num_units // 2, fqn
    c = ds.convert(m, verify_inputs=X)
    assert c.layer1[0].conv1.out_channels == m.layer1[0].conv1.out_channels // 2


def test_magnitude_keeps_the_largest_producer_rows():
    torch.manual_seed(0)
    m = timm.create_model("test_resnet").eval()
    w = m.layer1[0].conv1.weight
    norms = w.detach().abs().sum((1, 2, 3))
    ds.prune.structured_(m, {"channels": 0.5}, include="layer1.0")
    kept = m.layer1[0].act1.gate.keep_mask()
    assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.topk(norms, kept.sum().item()).indices.tolist())


def test_taylor_with_data_global_scope_on_vit():
    torch.manual_seed(0)
    v = timm.create_model("test_vit").eval()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))) for _ in range(2)]
    ds.prune.structured_(v, {"heads": 0.5, "neurons": 0.25}, importance="taylor", data=data, scope="global")
    assert _kept(v, "heads").kept == 6 and _kept(v, "neurons").keep_ratio == pytest.approx(0.75)
    ds.convert(v, verify_inputs=X)


def test_existing_gates_are_reused_and_bad_input_raises():
    m = timm.create_model("test_vit").eval()
    ds.sparsify_(m, {"heads": "hard_concrete"})
    ds.prune.structured_(m, {"heads": 0.5})
    assert all(isinstance(g, ds.FixedGate) for _, g in ds.named_gates(m))
    with pytest.raises(ds.ConfigError, match="fraction"):
        ds.prune.structured_(m, {"heads": 1.5})
    with pytest.raises(ds.ConfigError, match="mapping"):
        ds.prune.structured_(m, 0.5)

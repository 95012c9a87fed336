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


def test_sensitivity_per_layer_leaves_model_unchanged(tmp_path):
    from dynsparse.models import LeNet300100

    torch.manual_seed(0)
    m = LeNet300100(img_size=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(64, 1, 8, 8)
    y = m(x).argmax(-1)

    def acc(model):
        return float((model(x).argmax(-1) == y).float().mean())

    res = ds.prune.sensitivity(m, acc, ratios=[0.0, 0.5, 0.9])
    assert list(res.curves) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(c[0] == 1.0 for c in res.curves.values())  # ratio 0 is the unpruned model
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert res.ratios_for(1.0) == {"fc1.weight": 0.0, "fc2.weight": 0.0, "fc3.weight": 0.0}
    assert res.table().count("\n") == 4
    assert res.plot(tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ds.ConfigError, match="unknown layer"):
        ds.prune.sensitivity(m, acc, layers=["nope.weight"])


def test_sensitivity_of_gates():
    torch.manual_seed(0)
    v = timm.create_model("test_vit").eval()
    ds.sparsify_(v, {"heads": "fixed"})
    res = ds.prune.sensitivity(v, lambda mm: float(mm(X).abs().mean()), ratios=[0.0, 0.5], group="units")
    assert len(res.curves) == 6 and all(isinstance(g, ds.FixedGate) for _, g in ds.named_gates(v))
    assert all(int(g.keep_mask().sum()) == 2 for _, g in ds.named_gates(v))  # the model's own gates untouched


def test_an_importance_with_keys_that_name_no_gate_raises_naming_the_key():
    """A custom importance returning ``{"blocks.0.mlp.norm": ...}`` (no ``.gate``) raised a bare KeyError."""
    m = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(ds.ConfigError, match=r"'blocks\.0\.mlp\.norm'.*names no gate"):
        ds.prune.structured_(m, {"neurons": 0.5}, importance=lambda model, data=None: {"blocks.0.mlp.norm": 1.0})


def test_a_one_head_attention_keeps_its_head():
    """A one-head attention's ``heads`` gate is a single unit like a ``layers`` branch gate, but closing it would
    zero the attention instead of removing it: only ``layers`` gates may lose every unit (min_keep holds)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=1, embed_dim=16)
    ds.prune.structured_(model, {"heads": 0.9}, importance="magnitude")
    assert all(bool(g.keep_mask().all()) for f, g in ds.named_gates(model) if "attn" in f)
    ds.prune.structured_(model, {"layers": 0.5}, importance="random")  # branch gates still close
    assert not all(bool(g.keep_mask().all()) for f, g in ds.named_gates(model) if "attn" not in f)

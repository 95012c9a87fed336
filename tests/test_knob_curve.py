"""`knob_curve` counts the FLOPs of an input-dependent model per image and averages them."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.bench import knob_curve
from dynsparse.flops import count_flops
from dynsparse.layers.routing import RoutedBlock

KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=7)


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **KW).eval()


def _routed() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, list[int]]:
    """A routed ViT whose routers disagree across inputs, its dense twin, 6 images and each image's FLOPs."""
    m = ds.sparsify_(_vit(), {"depth": {"gate": "router", "blocks": "all", "keep": 0.5}})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # routers that disagree across inputs
        for b in m.blocks:
            if isinstance(b, RoutedBlock):
                b.router.proj.weight.copy_(torch.randn(b.router.proj.weight.shape, generator=g) * 2)
                b.router.proj.bias.zero_()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_image = [count_flops(m, x[i : i + 1]) for i in range(6)]
    return m, _vit(), x, per_image


def test_flops_are_the_mean_over_images_of_a_routed_model():
    m, dense, x, per_image = _routed()
    assert len(set(per_image)) > 1, "the routers should run different blocks for different images"
    curve = knob_curve(m, dense, lambda mod: 0.0, x, keeps=[0.5], batch_sizes=[1], rounds=1, flops_images=6)
    expected = sum(per_image) / 6 / count_flops(dense, x[:1])
    assert abs(curve.points[0].flops_ratio - expected) < 1e-12
    only_first = knob_curve(m, dense, lambda mod: 0.0, x, keeps=[0.5], batch_sizes=[1], rounds=1, flops_images=1)
    assert only_first.points[0].flops_ratio == per_image[0] / count_flops(dense, x[:1])


def test_a_refused_budget_changes_no_gate_and_names_the_gate() -> None:
    model = timm.create_model("test_vit", pretrained=False, img_size=32)
    m = ds.sparsify_(model, {"tokens": {"gate": "cls_attention", "blocks": [0, 1]}})
    before = ds.get_budget(m)
    bad = {"blocks.0.tokens.gate": 0.25, "blocks.1.tokens.gate": 1.5}
    with pytest.raises(ds.DynsparseError, match=r"blocks\.1\.tokens\.gate.*keep"), ds.budget(m, bad):
        pass
    assert ds.get_budget(m) == before, "a refused budget must leave every gate as it was"
    with pytest.raises(ds.DynsparseError, match=r"blocks\.1\.tokens\.gate"):
        ds.set_budget_(m, {"blocks.0.tokens.gate": 0.3, "blocks.1.tokens.gate": None})
    assert ds.get_budget(m) == before


def test_the_ideal_of_each_batch_size_is_counted_on_the_inputs_timed_at_it():
    # batch 1 times x[0] alone: its ideal is x[0]'s, not the mean over flops_images (a router spends different FLOPs
    # on each input, so one image is not the average)
    m, dense, x, per_image = _routed()
    d = count_flops(dense, x[:1])
    assert per_image[0] != sum(per_image) / 6
    curve = knob_curve(m, dense, lambda mod: 0.0, x, keeps=[0.5], batch_sizes=[1, 3], rounds=1, flops_images=6)
    p = curve.points[0]
    assert p.ideal[1] == pytest.approx(d / per_image[0], rel=1e-12)
    assert p.ideal[3] == pytest.approx(3 * d / sum(per_image[:3]), rel=1e-12)
    assert p.flops_ratio == pytest.approx(sum(per_image) / 6 / d, rel=1e-12)
    head = curve.table().splitlines()[0]
    assert "b1 ideal" in head and "b3 ideal" in head
    # batch sizes above flops_images: the timed inputs are counted too
    more = knob_curve(m, dense, lambda mod: 0.0, x, keeps=[0.5], batch_sizes=[4], rounds=1, flops_images=2)
    assert more.points[0].ideal[4] == pytest.approx(4 * d / sum(per_image[:4]), rel=1e-12)
    assert more.points[0].flops_ratio == pytest.approx(sum(per_image[:2]) / 2 / d, rel=1e-12)


def test_dense_ms_is_the_median_over_the_budgets(monkeypatch):
    # with an even number of budgets the median is the mean of the middle two (it used to be the upper one)
    from dynsparse.bench import knob as knob_mod
    from dynsparse.bench import latency

    seq = iter([1e-3, 3e-3])

    def fake(models, x, **kw):
        s = next(seq)
        return latency.LatencyResult(1, len(x), 1, {"dense": s, "model": s}, {"dense": 1.0, "model": 1.0})

    monkeypatch.setattr(latency, "compare_latency", fake)
    m = ds.sparsify_(_vit(), {"tokens": {"gate": "cls_attention", "blocks": [1], "keep": 0.5}})
    x = torch.randn(2, 3, 32, 32)
    curve = knob_mod.knob_curve(m, _vit(), lambda mod: 0.0, x, keeps=[1.0, 0.5], batch_sizes=[1])
    assert curve.dense_ms[1] == pytest.approx(2.0)

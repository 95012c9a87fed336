"""Per-input block routers: batched routing equals one by one, keep 1 is dense, the knob, training, saving."""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.layers.routing import RoutedBlock, depth_spec

ARCH = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=7),
}


def _vit():
    torch.manual_seed(0)
    return timm.create_model(ARCH["name"], pretrained=False, **ARCH["kwargs"]).eval()


def _routed(keep=0.5, blocks="all"):
    m = ds.sparsify_(_vit(), {"depth": {"gate": "router", "blocks": blocks, "keep": keep}})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: routers that disagree across inputs
        for b in m.blocks:
            if isinstance(b, RoutedBlock):
                b.router.proj.weight.copy_(torch.randn(b.router.proj.weight.shape, generator=g) * 2)
                b.router.proj.bias.zero_()
    return m


def _x(n=6):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_batched_routing_equals_one_by_one_and_inputs_differ():
    m = _routed().double()
    x = _x().double()
    with torch.no_grad():
        batch = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(len(x))])
        z, mixed = m._pos_embed(m.patch_embed(x)), []
        for b in m.blocks:
            runs = b.router(z).flatten()
            mixed.append(0 < runs.sum() < len(runs))
            z = b(z)
    torch.testing.assert_close(batch, single, atol=1e-10, rtol=1e-10)
    assert any(mixed)  # some block is skipped by some inputs and run by others


def test_keep_one_is_dense_and_the_knob_is_monotone():
    dense, m = _vit(), _routed()
    x = _x()
    flops = []
    with torch.no_grad():
        for keep in (1.0, 0.9, 0.5, 0.1, 1e-6):
            with ds.budget(m, keep):
                flops.append(ds.flops.count_flops(m, x))
        with ds.budget(m, 1.0):
            torch.testing.assert_close(m(x), dense(x))
        with ds.budget(m, 1e-6):  # nothing runs: the blocks are skipped, only the routers cost
            assert flops[-1] < 0.5 * flops[0]
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[2]


def test_training_reaches_the_router_and_penalty():
    m = _routed().train()
    keys = set(_vit().state_dict())
    assert keys < set(m.state_dict()) and all(".router." in k for k in set(m.state_dict()) - keys)
    out = m(_x())
    loss = out.logsumexp(-1).mean() + ds.penalty(m)
    loss.backward()
    for b in m.blocks:
        assert b.router.proj.weight.grad is not None and b.router.proj.weight.grad.abs().sum() > 0
    assert float(ds.penalty(m).detach()) > 0
    m.eval()
    assert float(ds.penalty(m)) == 0.0


def test_convert_save_load_keeps_routers(tmp_path):
    m = _routed(keep=0.4, blocks=[1, 3])
    x = _x(3)
    small = ds.convert(m, static=False, verify_inputs=x)
    assert small.slice_plan.dynamic["depth"]["blocks"] == [1, 3]
    ds.save(small, tmp_path / "r.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "r.safetensors")
    assert isinstance(back.blocks[1], RoutedBlock) and ds.get_budget(back) == ds.get_budget(m)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_errors_name_the_problem():
    with pytest.raises(ds.ConfigError, match=r"unknown block router 'ruter'.*Did you mean 'router'"):
        ds.sparsify_(_vit(), {"depth": {"gate": "ruter"}})
    with pytest.raises(ds.ConfigError, match=r"depth.blocks: 'all' or block indices in \[0, 4\)"):
        ds.sparsify_(_vit(), {"depth": {"blocks": [4]}})
    m = _vit()
    with pytest.raises(ds.ConfigError, match=r"blocks.1 selects tokens \('tokens' gate at block 1\); a 'depth' router"):
        ds.sparsify_(m, {"tokens": {"blocks": [1]}, "depth": {"blocks": [1, 2]}})
    assert type(m.blocks[1]) is type(_vit().blocks[1])  # refused before any module changed
    with pytest.raises(ds.ConfigError, match="token gates need plain timm Blocks"):
        ds.sparsify_(ds.sparsify_(_vit(), {"depth": {"blocks": [2]}}), {"tokens": {"blocks": [1]}})
    with pytest.raises(ds.ConfigError, match=r"depth.blocks: each block at most once"):
        ds.sparsify_(_vit(), {"depth": {"blocks": [1, 1]}})
    with pytest.raises(ds.ConfigError, match="target must be a fraction"):
        ds.sparsify_(_vit(), {"depth": {"target": 2.0}})


def test_trace_and_export_keep_per_input_decisions():
    m = _routed()
    x, other = _x(4), torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        traced = torch.jit.trace(m, (x,), check_trace=False)
        exported = torch.export.export(m, (x,)).module()
        for y in (x, other):  # a capture must not bake in the example's decisions
            torch.testing.assert_close(traced(y), m(y))
            torch.testing.assert_close(exported(y), m(y))


@pytest.mark.parametrize("depth_first", [False, True])
def test_layer_gates_on_routed_blocks_convert_and_reload(tmp_path, depth_first):
    """``layers`` gates and routers on the same blocks, in either order: a closed branch of a routed block converts."""
    spec = {"depth": {"blocks": [1, 2]}}
    if depth_first:
        m = ds.sparsify_(ds.sparsify_(_vit(), spec), {"layers": "fixed"})
    else:
        m = ds.sparsify_(_vit(), {"layers": "fixed", **spec})
    gates = dict(ds.named_gates(m))
    assert {"blocks.1.drop_path1.gate", "blocks.2.drop_path2.gate"} <= set(gates)  # routed blocks get layer gates
    closed = torch.tensor([False])
    ds.fix_gates_(m, {"blocks.1.drop_path1": closed, "blocks.2.drop_path1": closed, "blocks.2.drop_path2": closed})
    x = _x(3)
    small = ds.convert(m, static=False, verify_inputs=x)
    assert isinstance(small.blocks[1], RoutedBlock) and isinstance(small.blocks[2], torch.nn.Identity)
    assert small.slice_plan.dynamic["depth"]["blocks"] == [1]
    ds.save(small, tmp_path / "r.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "r.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(small(x), m.eval()(x))
        torch.testing.assert_close(back(x), small(x))


def test_include_exclude_choose_the_routed_blocks():
    """``depth`` takes ``include`` / ``exclude`` globs over the block fqns (``blocks.i``), with or without indices."""
    m = ds.sparsify_(_vit(), {"depth": {"exclude": ["blocks.0", "blocks.3"]}})
    assert [isinstance(b, RoutedBlock) for b in m.blocks] == [False, True, True, False]
    m = ds.sparsify_(_vit(), {"depth": {"blocks": [0, 1, 2]}}, include="blocks.[12]*")
    assert [isinstance(b, RoutedBlock) for b in m.blocks] == [False, True, True, False]
    assert depth_spec(m)["blocks"] == [1, 2]
    with pytest.raises(ds.ConfigError, match=r"depth: the blocks / include / exclude options leave no block"):
        ds.sparsify_(_vit(), {"depth": {"include": "blocks.9"}})
    with pytest.raises(ds.ConfigError, match=r"depth\.include must be a glob pattern"):
        ds.sparsify_(_vit(), {"depth": {"include": 3}})


def test_all_blocks_of_a_converted_model_leave_removed_blocks_out():
    """``blocks='all'`` on a converted model: a block removed by closed layer gates (nn.Identity) is not routed."""
    m = ds.sparsify_(_vit(), {"layers": "fixed"})
    ds.fix_gates_(m, {"blocks.2.drop_path1": torch.tensor([False]), "blocks.2.drop_path2": torch.tensor([False])})
    small = ds.sparsify_(ds.convert(m), {"depth": {}})
    assert [isinstance(b, RoutedBlock) for b in small.blocks] == [True, True, False, True]
    assert isinstance(small.blocks[2], torch.nn.Identity)

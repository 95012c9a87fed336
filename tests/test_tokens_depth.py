"""Token gates and block routers in one model: fast paths equal the masked reference, per-input decisions, the knob.

The fast paths are gathered tokens (``cls_attention`` / ``predictor``: every input the same count, routers group
inputs along the batch) and packed tokens (``threshold``: per-input counts, routers pick per-input segments);
the reference is the masked path (``mask_inference``: every input keeps all its tokens under the keep policy,
every block runs and a skipped block's update is dropped).
"""

from __future__ import annotations

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse.gates.routers import BlockRouter
from dynsparse.gates.tokens import TokenGate
from dynsparse.layers.routing import RoutedBlock, RoutedPolicyBlock
from dynsparse.layers.tokens import PolicyBlock, TokenGatedBlock, calibrate_tokens_

GATES = ["cls_attention", "predictor", "threshold"]
ARCH = {
    "name": "vit_small_patch16_224",
    "kwargs": dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=4, num_classes=7),
}


def _vit(**kw):
    torch.manual_seed(0)
    return timm.create_model(ARCH["name"], pretrained=False, **{**ARCH["kwargs"], **kw}).eval()


def _x(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    return x * torch.linspace(0.2, 3.0, n, dtype=torch.float64).view(n, 1, 1, 1)  # different token counts


def _both(gate, model=None, token_blocks=(1, 3), keep=0.5, depth="all", pool="mean"):
    """Token gates at ``token_blocks`` and routers on ``depth``, router weights random (inputs disagree)."""
    tokens = {"gate": gate, "blocks": list(token_blocks)}
    tokens.update({"threshold": 1.0} if gate == "threshold" else {"keep": keep})
    spec = {"depth": {"gate": "router", "blocks": depth, "keep": 0.5, "pool": pool}, "tokens": tokens}
    m = ds.sparsify_(model if model is not None else _vit(), spec).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in m.blocks:
            if isinstance(b, RoutedBlock):
                b.router.proj.weight.copy_(torch.randn(b.router.proj.weight.shape, generator=g, dtype=torch.float64))
                b.router.proj.bias.fill_(1.0)
    return m


def _masked(model, on: bool) -> None:
    for b in model.blocks:
        if isinstance(b, TokenGatedBlock):
            b.tokens.mask_inference = on


def _decisions(model, x):
    """Per routed block, the inputs that run it, recorded on the masked reference (every router sees every input)."""
    seen = []
    hooks = [
        b.router.register_forward_hook(lambda mod, args, out: seen.append(out.flatten() > 0))
        for b in model.blocks
        if isinstance(b, RoutedPolicyBlock)
    ]
    _masked(model, True)
    try:
        with torch.no_grad():
            model(x)
    finally:
        _masked(model, False)
        for h in hooks:
            h.remove()
    return seen


def test_sparsify_installs_both_parts_in_either_spec_order():
    m = _both("cls_attention")
    kinds = [type(b) for b in m.blocks]
    assert kinds == [
        RoutedBlock,
        TokenGatedBlock,
        RoutedPolicyBlock,
        TokenGatedBlock,
        RoutedPolicyBlock,
        RoutedPolicyBlock,
    ]
    assert isinstance(m.blocks[2], PolicyBlock)
    budget = ds.get_budget(m)
    assert "blocks.1.tokens.gate" in budget and "blocks.5.router" in budget and "blocks.1.router" not in budget


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2}, {"init_values": 0.1}])
def test_fast_path_equals_masked_reference(gate, kw):
    """Gathered / packed tokens with routed blocks equal the masked path on the same decisions (float64)."""
    m = _both(gate, _vit(**kw))
    x = _x()
    runs = _decisions(m, x)
    assert any(0 < int(r.sum()) < len(r) for r in runs), runs  # some block runs for some inputs only
    P = m.num_prefix_tokens
    with torch.no_grad():
        fast, fast_feat = m(x), m.forward_features(x)
        _masked(m, True)
        slow, slow_feat = m(x), m.forward_features(x)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast_feat[:, :P], slow_feat[:, :P], atol=1e-10, rtol=1e-10)  # every prefix token


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("pool", ["mean", "token"])
def test_batch_equals_inputs_one_by_one(gate, pool):
    m = _both(gate, pool=pool)
    x = _x(6)
    with torch.no_grad():
        batch = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, single, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["pad", "loop"])
def test_packed_routing_with_both_attention_layouts(mode):
    m = _both("threshold")
    m.blocks[1]._token_state.attention = mode
    x = _x(9)
    lengths = []
    hook = m.blocks[2].register_forward_pre_hook(lambda mod, args: lengths.append(mod._token_state.packing.lengths))
    with torch.no_grad():
        batch = m(x)
        single = torch.cat([m(x[i : i + 1]) for i in range(len(x))])
    hook.remove()
    assert len(set(lengths[0])) > 1, lengths  # a variable count per input reaches the routed block
    torch.testing.assert_close(batch, single, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("gate", GATES)
def test_prefix_tokens_kept_at_the_smallest_budget(gate):
    m = _both(gate, _vit(reg_tokens=3), keep=0.01)
    P = m.num_prefix_tokens
    x = _x(4)
    if gate == "threshold":
        with torch.no_grad():
            calibrate_tokens_(m, x)
    ds.set_budget_(m, 0.01, kind=TokenGate)
    with torch.no_grad():
        feat = m.forward_features(x)
        _masked(m, True)
        ref = m.forward_features(x)
    assert feat.shape == (4, P + 1, 32)  # the prefix and each input's best token
    torch.testing.assert_close(feat[:, :P], ref[:, :P], atol=1e-10, rtol=1e-10)
    policy = m.blocks[1]._token_state.policy
    assert bool((policy[:, :P] == 1).all()) and int(policy[0, P:].sum()) == 1


@pytest.mark.parametrize("gate", GATES)
def test_knob_drives_both_parts_and_is_monotone(gate):
    dense, m = _vit().double(), _both(gate)
    x = _x(4)
    if gate == "threshold":
        with torch.no_grad():
            calibrate_tokens_(m, x)
    flops = []
    with torch.no_grad():
        for keep in (1.0, 0.8, 0.6, 0.4, 0.2):
            with ds.budget(m, keep):
                flops.append(ds.flops.count_flops(m, x))
        with ds.budget(m, 1.0):  # every token and every block: the dense model (plus the gates' scores)
            torch.testing.assert_close(m(x), dense(x), atol=1e-10, rtol=1e-10)
        with ds.budget(m, 0.5):
            both = ds.flops.count_flops(m, x)
            with ds.budget(m, 1.0, kind=BlockRouter):
                tokens_only = ds.flops.count_flops(m, x)
            with ds.budget(m, 1.0, kind=TokenGate):
                routers_only = ds.flops.count_flops(m, x)
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1], flops
    assert both < tokens_only < flops[0] and both < routers_only < flops[0]  # the FLOPs count both savings


@pytest.mark.parametrize("gate", GATES)
def test_batch_flops_are_the_sum_of_per_input_flops(gate):
    m = _both(gate)
    m.blocks[1]._token_state.attention = "loop"  # no padded attention in a packed batch
    x = _x(5)
    with torch.no_grad():
        total = ds.flops.count_flops(m, x)
        per_input = [ds.flops.count_flops(m, x[i : i + 1]) for i in range(len(x))]
    assert total == sum(per_input) and len(set(per_input)) > 1, per_input


@pytest.mark.parametrize("gate", GATES)
def test_training_reaches_routers_and_token_gates(gate):
    m = _both(gate).train()
    out = m(_x(4))
    loss = out.logsumexp(-1).mean() + ds.penalty(m)
    loss.backward()
    for b in m.blocks:
        if isinstance(b, RoutedBlock):
            grad = b.router.proj.weight.grad
            assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0, b
    params = [p for b in m.blocks if isinstance(b, TokenGatedBlock) for p in b.tokens.gate.parameters()]
    assert (len(params) > 0) == (gate != "cls_attention")
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in params)
    assert float(ds.penalty(m).detach()) > 0


@pytest.mark.parametrize("gate", ["cls_attention", "threshold"])
def test_convert_save_load_keeps_both_parts(gate, tmp_path):
    m = _both(gate, keep=0.4).float()
    x = _x(3).float()
    if gate == "threshold":
        with torch.no_grad():
            calibrate_tokens_(m, x)
        ds.set_budget_(m, 0.6, kind=TokenGate)
    ds.set_budget_(m, 0.7, kind=BlockRouter)
    small = ds.convert(m, static=False, verify_inputs=x)
    assert set(small.slice_plan.dynamic) == {"tokens", "depth"}
    assert small.slice_plan.dynamic["depth"]["blocks"] == [0, 2, 4, 5]
    ds.save(small, tmp_path / "m.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "m.safetensors")
    assert [type(b) for b in back.blocks] == [type(b) for b in m.blocks]
    assert ds.get_budget(back) == ds.get_budget(m)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_refusals_name_both_parts():
    m = ds.sparsify_(_vit(), {"tokens": {"blocks": [1]}})
    with pytest.raises(ds.ConfigError, match=r"blocks.1 selects tokens \('tokens' gate at block 1\); a 'depth' router"):
        ds.sparsify_(m, {"depth": {"blocks": [0, 1]}})
    assert type(m.blocks[0]) is type(_vit().blocks[0])
    routed = ds.sparsify_(_vit(), {"depth": {"blocks": [2]}})
    with pytest.raises(ds.ConfigError, match="add token gates before routers"):
        ds.sparsify_(routed, {"tokens": {"blocks": [1]}})
    with pytest.raises(ds.ConfigError, match="at most one router"):
        ds.sparsify_(_both("cls_attention"), {"depth": {"blocks": [2]}})


def _layered(gate, together, routed):
    """Token gates at blocks 1 and 3, optionally routers on the other blocks, fixed ``layers`` gates on the blocks
    that do not select tokens: put on before the token gates (one spec) or after them."""
    layers = {"gate": "fixed", "exclude": ["blocks.1", "blocks.3"]}
    tokens = {"gate": gate, "blocks": [1, 3]}
    tokens.update({"threshold": 1.0} if gate == "threshold" else {"keep": 0.5})
    spec = {"tokens": tokens, **({"depth": {"keep": 0.5}} if routed else {})}
    if together:
        m = ds.sparsify_(_vit(), {"layers": layers, **spec})
    else:
        m = ds.sparsify_(ds.sparsify_(_vit(), spec), {"layers": layers})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in m.blocks:
            if isinstance(b, RoutedBlock):
                b.router.proj.weight.copy_(torch.randn(b.router.proj.weight.shape, generator=g))
                b.router.proj.bias.fill_(1.0)
    return m


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize(("together", "routed"), [(True, True), (False, True), (True, False)])
def test_closed_layer_gates_after_token_gates_convert_exactly_and_reload(gate, together, routed, tmp_path):
    """A closed branch of a block after a token gate (attention, MLP, or both) is removed and a branch value folded
    at convert: the converted model equals the gated one on the fast path and on the masked path, and reloads."""
    m = _layered(gate, together, routed)
    assert "blocks.2.drop_path1.gate" in dict(ds.named_gates(m))  # a (routed) block after a token gate
    closed = torch.tensor([False])
    shut = ["blocks.2.drop_path1", "blocks.4.drop_path1", "blocks.4.drop_path2", "blocks.5.drop_path1"]
    ds.fix_gates_(m, dict.fromkeys(shut, closed))
    m.blocks[2].drop_path2.gate.values.fill_(0.5)  # folded into the MLP's fc2
    x = _x(4).float()
    small = ds.convert(m, static=False, verify_inputs=x)
    assert isinstance(small.blocks[4], torch.nn.Identity)
    assert isinstance(small.blocks[2], RoutedPolicyBlock if routed else PolicyBlock)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x))
        _masked(m, True)
        _masked(small, True)
        torch.testing.assert_close(small(x), m(x))
        _masked(m, False)
        _masked(small, False)
    ds.save(small, tmp_path / "m.safetensors", arch=ARCH)
    back = ds.load(tmp_path / "m.safetensors")
    assert [type(b) for b in back.blocks] == [type(b) for b in small.blocks]
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))


def test_layer_gates_on_a_block_that_selects_tokens_are_refused_by_name():
    """Its attention scores the tokens, so its branches cannot be removed: refused in either order, not skipped."""
    m = ds.sparsify_(_vit(), {"tokens": {"blocks": [1, 3]}})
    with pytest.raises(ds.UnsupportedModuleError, match=r"'blocks\.1' \(TokenGatedBlock\).*selects tokens"):
        ds.sparsify_(m, {"layers": "fixed"})
    ds.sparsify_(m, {"layers": "fixed"}, on_unsupported="skip")
    gated = {f.split(".")[1] for f, _ in ds.named_gates(m) if "drop_path" in f}
    assert gated == {"0", "2", "4", "5"}
    fresh = _vit()
    with pytest.raises(
        ds.ConfigError, match=r"tokens\.blocks: blocks\.1 holds 'layers' gates.*selects tokens takes none"
    ):
        ds.sparsify_(fresh, {"layers": "fixed", "tokens": {"blocks": [1]}})
    assert not list(ds.named_gates(fresh))


def test_a_last_block_left_without_branches_is_refused_at_convert():
    """The last block hands the kept tokens to the head: closing both its branches cannot be converted."""
    m = ds.sparsify_(_vit(), {"layers": {"gate": "fixed", "include": "blocks.5"}, "tokens": {"blocks": [1]}})
    ds.fix_gates_(m, {"blocks.5.drop_path1": torch.tensor([False]), "blocks.5.drop_path2": torch.tensor([False])})
    with pytest.raises(ds.ConfigError, match=r"tokens: blocks\.5, the last block"):
        ds.convert(m, static=False)

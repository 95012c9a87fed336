"""Block masks, N:M masks and `BlockSparseLinear`.

Invariants: a block mask removes exactly ``round(s · n_blocks)`` whole blocks, the weakest ones; an N:M mask keeps
exactly N of every M consecutive input weights, the largest; `BlockSparseLinear` equals ``F.linear`` with the
masked weight in both modes, in grad mode, ``no_grad`` and ``inference_mode``. Speed is measured by
``benchmarks/block_sparse.py``, never here.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynsparse import ConfigError, DynsparseError, prune
from dynsparse.prune import BlockSparseLinear, block_mask, nm_mask

torch.set_num_threads(1)


def count(fraction, n):
    return math.floor(fraction * n + 0.5)


# ---------------------------------------------------------------- block_mask


@settings(max_examples=40, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    block=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    sparsity=st.floats(0.0, 1.0),
    score=st.sampled_from(["l1", "l2"]),
    seed=st.integers(0, 2**16),
)
def test_block_mask_removes_exactly_the_weakest_blocks(grid, block, sparsity, score, seed):
    (gr, gc), (bh, bw) = grid, block
    w = torch.randn(gr * bh, gc * bw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = block_mask(w, block, sparsity, score)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    tiles = mask.reshape(gr, bh, gc, bw).permute(0, 2, 1, 3).reshape(gr, gc, -1)
    assert bool((tiles.all(-1) | ~tiles.any(-1)).all()), "a block is partly kept"
    kept = tiles[..., 0]
    assert int((~kept).sum()) == count(sparsity, gr * gc)
    t = w.reshape(gr, bh, gc, bw).permute(0, 2, 1, 3).reshape(gr, gc, -1)
    norms = t.abs().sum(-1) if score == "l1" else t.square().sum(-1).sqrt()
    if kept.any() and (~kept).any():
        assert norms[kept].min() >= norms[~kept].max()


def test_l1_and_l2_block_scores_differ():
    # block 0: one large weight (l1 = 4, l2 = 4); block 1: four medium weights (l1 = 6, l2 = 3)
    w = torch.tensor([[4.0, 0.0, 1.5, 1.5], [0.0, 0.0, 1.5, 1.5]])
    assert block_mask(w, 2, 0.5, "l1")[0].tolist() == [False, False, True, True]
    assert block_mask(w, 2, 0.5, "l2")[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(6, 8), 4, 0.5), r"not divisible by the block \(4, 4\)"),
        ((torch.ones(2, 2, 2), 1, 0.5), "2-D weight"),
        ((torch.ones(4, 4), 0, 0.5), "block must be"),
        ((torch.ones(4, 4), 2, 1.2), "sparsity"),
        ((torch.ones(4, 4), 2, 0.5, "l3"), "unknown block score 'l3'"),
    ],
)
def test_block_mask_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        block_mask(*args)


# ---------------------------------------------------------------- nm_mask


@settings(max_examples=40, deadline=None)
@given(
    nm=st.integers(1, 8).flatmap(lambda m: st.tuples(st.integers(0, m), st.just(m))),
    rows=st.integers(1, 5),
    groups=st.integers(1, 5),
    conv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_mask_keeps_exactly_n_largest_per_group(nm, rows, groups, conv, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, groups * m, 1, 1) if conv else (rows, groups * m)
    w = torch.randn(shape, generator=gen)
    if conv:  # a real (out, in, kh, kw) layout: the groups run along in, for each kernel position
        w = torch.randn((rows, groups * m, 2, 3), generator=gen)
    mask = nm_mask(w, n, m)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    g = mask.movedim(1, -1).reshape(-1, m)
    assert bool((g.sum(1) == n).all())
    assert bool(((w * mask) != 0).movedim(1, -1).reshape(-1, m).sum(1).eq(n).all())  # exactly n non-zeros
    a = w.abs().movedim(1, -1).reshape(-1, m)
    if 0 < n < m:
        kept_min = torch.where(g, a, torch.inf).min(1).values
        dropped_max = torch.where(g, -torch.inf, a).max(1).values
        assert bool((kept_min >= dropped_max).all())


def test_nm_mask_of_a_conv_groups_input_channels_as_nvidia_asp():
    """2:4 of a conv weight (out, in, kh, kw) runs along ``in`` for each kernel position (ASP permutes to
    (kh, kw, out, in)); the groups ran along the flattened ``in · kh · kw``, mixing kernel positions of one input
    channel, a pattern no sparse tensor-core kernel reads."""
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 1.0, 3.0, 2.0])  # kernel position (0, 0): channels 0 and 2 are the largest
    w[0, :, 0, 1] = torch.tensor([1.0, 4.0, 2.0, 3.0])  # kernel position (0, 1): channels 1 and 3
    mask = nm_mask(w)
    assert mask[0, :, 0, 0].tolist() == [True, False, True, False]
    assert mask[0, :, 0, 1].tolist() == [False, True, False, True]
    for i in range(3):  # a 3×3 conv: every (out, kh, kw) keeps exactly 2 of each 4 consecutive input channels
        w3 = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(i))
        per_position = nm_mask(w3).permute(0, 2, 3, 1).reshape(-1, 4)
        assert bool((per_position.sum(1) == 2).all())
    with pytest.raises(ConfigError, match="input size 3"):
        nm_mask(torch.ones(4, 3, 2, 2))  # 12 weights per row, but 3 input channels: no 2:4 layout


def test_nm_mask_2_4_example():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 9.0, 8.0, -7.0, 0.0]])
    assert nm_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(2, 6), 2, 4), "not divisible by m=4"),
        ((torch.ones(2, 8), 5, 4), "n must be"),
        ((torch.ones(2, 8), 2, 0), "m must be"),
        ((torch.ones(8), 2, 4), "2 or more dims"),
    ],
)
def test_nm_mask_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        nm_mask(*args)


# ---------------------------------------------------------------- BlockSparseLinear


def make(mode, bias=True, dtype=torch.float32, sparsity=0.75, block=8):
    torch.manual_seed(0)
    lin = nn.Linear(32, 48, bias=bias).to(dtype)
    layer = BlockSparseLinear.from_linear(lin, block=block, sparsity=sparsity, force=mode)
    return lin, layer


def masked_ref(lin, layer, x):
    w = lin.weight.detach() * block_mask(lin.weight, layer.block, layer.sparsity(), "l1")
    return F.linear(x, w, None if lin.bias is None else lin.bias.detach())


SHAPES = [(2, 5, 32), (7, 32), (32,), (1, 1, 32), (2, 0, 32)]


@pytest.mark.parametrize("mode", ["bsr", "dense"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_block_sparse_linear_equals_masked_dense(mode, bias, dtype, context):
    lin, layer = make(mode, bias, dtype)
    assert layer.mode == mode
    assert layer.sparsity() == 0.75
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    for shape in SHAPES:
        x = torch.randn(shape, dtype=dtype)
        with ctx():
            y = layer(x)
            ref = F.linear(x, layer.weight, layer.bias)
        assert y.shape == (*shape[:-1], 48) and y.dtype == dtype
        torch.testing.assert_close(y, ref, msg=lambda m, s=shape: f"{s}: {m}")
        torch.testing.assert_close(y, masked_ref(lin, layer, x), msg=lambda m, s=shape: f"{s}: {m}")


def test_both_modes_agree_and_the_bsr_path_runs():
    _, dense = make("dense", dtype=torch.float64)
    _, bsr = make("bsr", dtype=torch.float64)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    with torch.inference_mode():
        yb, yd = bsr(x), dense(x)
    torch.testing.assert_close(yb, yd)
    assert bsr._bsr_cache is not None and bsr._bsr_cache[1].layout == torch.sparse_bsr
    assert dense._bsr_cache is None
    # 0.75 of the (6 x 4) blocks removed: the BSR tensor holds only the 6 kept ones
    assert bsr._bsr_cache[1].values().shape == (6, 8, 8)


def test_grad_mode_uses_dense_and_backpropagates():
    _, layer = make("bsr")
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()  # the BSR kernel has no backward on CPU: the dense path must run
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 32))
    assert not layer.weight.requires_grad


def test_state_dict_matches_linear_and_cache_follows_the_weight():
    lin, layer = make("bsr")
    assert set(layer.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)  # builds the BSR cache
    other = nn.Linear(32, 48)
    other.weight.data *= block_mask(other.weight, 8, 0.5)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), other(x))


def test_refresh_after_a_change_through_weight_data():
    _, layer = make("bsr")
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)  # builds the BSR cache
        layer.weight.data.mul_(2)  # the .data version counter: the cache cannot see it
        assert layer.refresh_() is layer and layer._bsr_cache is None
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_to_linear_is_plain_and_equal():
    _, layer = make("bsr", dtype=torch.float64)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float64 and plain.weight.requires_grad
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x))
    assert plain.weight.data_ptr() != layer.weight.data_ptr()


def test_from_linear_leaves_the_linear_alone_and_keeps_existing_zeros():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    before = lin.weight.detach().clone()
    layer = BlockSparseLinear.from_linear(lin, block=8, sparsity=0.5, force="dense")
    assert torch.equal(lin.weight, before)
    assert layer.sparsity() == 0.5
    again = BlockSparseLinear.from_linear(layer.to_linear(), block=8, sparsity=None, force="bsr")
    assert torch.equal(again.weight, layer.weight) and again.sparsity() == 0.5


def test_deepcopy_and_pickle_drop_the_bsr_cache():
    _, layer = make("bsr")
    x = torch.randn(2, 32)
    with torch.no_grad():
        y = layer(x)
        clone = copy.deepcopy(layer)
        buf = io.BytesIO()
        pickle.dump(layer, buf)
        loaded = pickle.loads(buf.getvalue())
        torch.testing.assert_close(clone(x), y)
        torch.testing.assert_close(loaded(x), y)
    assert clone.mode == loaded.mode == "bsr"


def test_extra_repr_shows_the_mode():
    _, layer = make("bsr")
    assert "mode=bsr" in repr(layer) and "block=(8, 8)" in repr(layer) and "sparsity=0.7500" in repr(layer)
    _, layer = make("dense")
    assert "mode=dense" in repr(layer)


def test_calibrate_picks_a_mode_and_restores_threads():
    torch.set_num_threads(1)
    threads = torch.get_num_threads()
    _, layer = make(None, sparsity=0.5, block=16)
    assert layer.mode in ("bsr", "dense")
    assert set(layer.measured) == {(1, 1, 32), (1, 197, 32)}
    assert "measured" in repr(layer)
    layer.calibrate_(torch.randn(4, 32), rounds=3, warmup=1, min_speedup=math.inf)
    assert layer.mode == "dense" and set(layer.measured) == {(4, 32)}
    assert torch.get_num_threads() == threads
    with pytest.raises(ConfigError, match=r"need \(\.\.\., 32\)"):
        layer.calibrate_(torch.randn(4, 31))
    with pytest.raises(ConfigError, match="rounds"):
        layer.calibrate_(rounds=1)
    layer.calibrate_(torch.randn(1, 32), rounds=2, warmup=1, cache="cold")
    assert layer.mode in ("bsr", "dense") and set(layer.measured) == {(1, 32)}
    with pytest.raises(ConfigError, match="cache must be"):
        layer.calibrate_(cache="hot")


def test_unsupported_dtype_falls_back_to_dense():
    lin = nn.Linear(32, 32).to(torch.bfloat16)
    layer = BlockSparseLinear.from_linear(lin, block=8, sparsity=0.5, rounds=2)
    assert layer.mode == "dense" and layer.measured == {}
    with pytest.raises(DynsparseError, match=r"BSR kernel fails for torch\.bfloat16"):
        layer.force_("bsr")
    with torch.no_grad():
        x = torch.ones(2, 32, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"block": 5}, ConfigError, r"not divisible by the block \(5, 5\)"),
        ({"block": 8, "force": "csr"}, ConfigError, "mode must be"),
        ({"block": 8, "score": "linf"}, ConfigError, "unknown block score"),
    ],
)
def test_block_sparse_linear_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BlockSparseLinear.from_linear(nn.Linear(32, 48), sparsity=0.5, **{"force": "dense", **kwargs})


def test_nm_and_block_masks_work_with_apply_masks():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    prune.apply_masks_(model, {"0.weight": nm_mask(model[0].weight), "2.weight": block_mask(model[2].weight, 8, 0.5)})
    assert prune.sparsity(model).layers == {"0.weight": 0.5, "2.weight": 0.5}


def test_nm_mask_ties_prune_the_lower_index_on_every_size():
    # topk's choice among equal values is unspecified (it kept the middle of a 16-group): the stable rule is
    # the one unstructured_ / unstructured_masks use, the lower index pruned first
    for n, m in [(2, 4), (3, 16), (8, 32)]:
        mask = nm_mask(torch.ones(2, 2 * m), n, m)
        expected = torch.tensor([False] * (m - n) + [True] * n).repeat(2, 2)
        assert torch.equal(mask, expected), (n, m, mask.int().tolist())
    w = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 2.0, 0.0]])
    assert nm_mask(w).tolist() == [[False, True, True, False, False, False, True, True]]


@settings(max_examples=30, deadline=None)
@given(nm=st.integers(1, 16).flatmap(lambda m: st.tuples(st.integers(0, m), st.just(m))), seed=st.integers(0, 2**16))
def test_nm_mask_agrees_with_row_masks_of_each_group(nm, seed):
    from dynsparse.importance import unstructured_masks

    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (3, 2 * m), generator=gen).float()  # many ties
    groups = {"w": w.abs().reshape(-1, m)}
    ref = unstructured_masks(groups, (m - n) / m, scope="row")["w"].reshape(w.shape)
    assert torch.equal(nm_mask(w, n, m), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_dtype_change_sets_the_mode_back_to_dense(dtype):
    _, layer = make("bsr")
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer(x)  # builds the BSR cache
    layer.measured = {(1, 32): 2.0}
    moved = layer.to(dtype)  # the BSR kernel has no float16 / bfloat16 CPU implementation: it raised here
    assert moved is layer and layer.mode == "dense" and layer.measured == {} and layer._bsr_cache is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x.to(dtype)), F.linear(x.to(dtype), layer.weight, layer.bias))
    if dtype == torch.float64:  # it may be forced back where the kernel exists
        assert layer.force_("bsr").mode == "bsr"


def test_a_move_to_the_same_dtype_and_device_keeps_the_mode():
    _, layer = make("bsr")
    layer.measured = {(1, 32): 2.0}
    layer.to(torch.float32).float().cpu()
    assert layer.mode == "bsr" and layer.measured == {(1, 32): 2.0}

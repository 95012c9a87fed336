"""The compiled conv-weight gather: exact against PyTorch indexing, no write past the output, bad indices refused,
and FBS blocks that give the same outputs with and without it."""

from __future__ import annotations

import copy
import itertools

import pytest
import timm
import torch

import dynsparse as ds
from dynsparse import kernels
from dynsparse.errors import DynsparseError
from dynsparse.layers import channel_kernels

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no kernels: {kernels.why_unavailable()}")

SHAPES = [(16, 24, 3), (13, 21, 3), (8, 5, 1), (40, 64, 1), (9, 7, 5), (32, 8, 3)]  # I not a multiple of 8 too


def _reference(w, rows, cols, scale):
    out = w if rows is None else w[rows]
    out = out if cols is None else out[:, cols]
    if scale is None:
        return out
    return out * (scale if rows is None else scale[rows]).view(-1, *[1] * (w.dim() - 1))


@needs_kernels
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_pytorch_indexing_exactly(fmt, shape):
    o, i, k = shape
    g = torch.Generator().manual_seed(o * i + k)
    w = torch.randn(o, i, k, k, generator=g).contiguous(memory_format=fmt)
    rows = torch.randperm(o, generator=g)[: max(1, o // 3)]  # any order
    cols = torch.randperm(i, generator=g)[: max(1, i // 2)].sort().values
    scale = torch.randn(o, generator=g)
    for r, c, with_scale in itertools.product((None, rows), (None, cols), (False, True)):
        if r is None and c is None:
            continue
        s = scale if with_scale else None
        got = kernels.conv_gather(w, r, c, s)
        assert torch.equal(got, _reference(w, r, c, s)), (r is None, c is None, with_scale)
        assert got.is_contiguous(memory_format=fmt)


@needs_kernels
def test_matrices_and_every_or_no_column():
    w = torch.randn(12, 19)
    cols = torch.arange(19)
    assert torch.equal(kernels.conv_gather(w, None, cols), w)
    assert kernels.conv_gather(w, None, torch.empty(0, dtype=torch.long)).shape == (12, 0)
    assert kernels.conv_gather(w, torch.tensor([3, 3, 0]), None).equal(w[[3, 3, 0]])  # rows may repeat


@needs_kernels
@pytest.mark.parametrize("i", [8, 16, 21, 64])
def test_nothing_is_written_past_the_output(i):
    """The left-pack stores eight floats at a time; the last ones must not spill past the end of the output."""
    lib = kernels.load()
    w = torch.randn(6, 3, i)  # (O, K, I): the channels-last layout
    cols = torch.arange(0, i, 3, dtype=torch.int64)  # the last kept column lies in the last chunk
    n_out = 6 * 3 * cols.numel()
    buf = torch.full((n_out + 16,), float("nan"))
    rc = lib.ds_conv_gather(w.data_ptr(), 6, 3, i, 1, None, 6, cols.data_ptr(), cols.numel(), None, buf.data_ptr())
    assert rc == 0
    assert torch.equal(buf[:n_out], w[:, :, cols].reshape(-1))
    assert torch.isnan(buf[n_out:]).all()


@needs_kernels
def test_bad_arguments_are_refused_by_name():
    w = torch.randn(8, 16, 3, 3)
    with pytest.raises(DynsparseError, match="strictly increasing"):
        kernels.conv_gather(w, None, torch.tensor([3, 1]))
    with pytest.raises(DynsparseError, match="strictly increasing"):
        kernels.conv_gather(w, None, torch.tensor([1, 1]))
    with pytest.raises(DynsparseError, match=r"\[0, 8\)"):
        kernels.conv_gather(w, torch.tensor([8]), None)
    with pytest.raises(DynsparseError, match="one value per filter"):
        kernels.conv_gather(w, torch.tensor([1, 2]), None, torch.ones(2))
    with pytest.raises(DynsparseError, match="float32"):
        kernels.conv_gather(w.double(), None, torch.tensor([1]))
    with pytest.raises(DynsparseError, match="contiguous"):
        kernels.conv_gather(w.transpose(0, 1), None, torch.tensor([1]))
    with pytest.raises(DynsparseError, match="conv_gather"):
        kernels.conv_gather(torch.randn(4, 4, 4), None, torch.tensor([1]))


@needs_kernels
def test_indices_that_are_not_integer_cpu_tensors_are_refused():
    w = torch.randn(8, 16, 3, 3)
    for bad in (torch.tensor([False, True]), torch.ones(8, dtype=torch.bool), torch.tensor([0.0, 1.0])):
        with pytest.raises(DynsparseError, match="rows must be an integer CPU tensor"):
            kernels.conv_gather(w, bad, None)
        with pytest.raises(DynsparseError, match="cols must be an integer CPU tensor"):
            kernels.conv_gather(w, None, bad)
    with pytest.raises(DynsparseError, match=r"rows must be an integer CPU tensor .*, got torch.int64 on meta"):
        kernels.conv_gather(w, torch.tensor([0, 1], device="meta"), None)
    assert torch.equal(kernels.conv_gather(w, torch.tensor([2, 0], dtype=torch.int32), None), w[[2, 0]])


def test_weight_helper_falls_back_to_pytorch_for_unsorted_columns():
    w = torch.randn(8, 16, 3, 3)
    cols = torch.tensor([5, 2, 9])
    with torch.no_grad():
        assert torch.equal(channel_kernels._weight(w, torch.tensor([1, 0]), cols), w[[1, 0]][:, cols])


@needs_kernels
@pytest.mark.parametrize("name,fmt", [("resnet18", torch.channels_last), ("resnet26", torch.contiguous_format)])
def test_fbs_blocks_give_the_same_outputs_without_the_kernel(monkeypatch, name, fmt):
    torch.manual_seed(0)
    kw = dict(num_classes=5, zero_init_last=False)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    ds.sparsify_(m, {"channels": {"gate": "fbs", "keep": 0.5}})
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ == "FBSGate":
                mod.fc.weight.normal_(0, mod.in_dim**-0.5)  # saliencies near 1: no overflow through the blocks
                mod.fc.bias.fill_(1.0)
            if isinstance(mod, torch.nn.BatchNorm2d):  # BatchNorm that is not the identity
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    m = m.to(memory_format=fmt)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.inference_mode():
        fast = torch.cat([m(x[b : b + 1]) for b in range(3)] + [m(x)])
    monkeypatch.setattr(kernels, "load", lambda: None)
    with torch.inference_mode():
        plain = torch.cat([m(x[b : b + 1]) for b in range(3)] + [m(x)])
    assert torch.isfinite(plain).all()
    # with the kernel every gathered conv takes its BatchNorm folded in (the scale is free during the copy);
    # without it only where the weight is smaller than the output: the same values up to float rounding
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_folded_batchnorm_follows_changed_statistics():
    """The block caches its folded BatchNorm; a changed running statistic or affine weight is picked up."""
    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False, num_classes=5, zero_init_last=False).eval()
    ds.sparsify_(m, {"channels": {"gate": "fbs", "keep": 0.5}})
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        m(x)
    assert any("_bn_folds" in mod.__dict__ for mod in m.modules())
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.mul_(3.0)
                mod.weight.add_(0.5)
    with torch.inference_mode():
        fast = m(x)
    for mod in m.modules():
        if hasattr(mod, "strategy"):
            mod.strategy = "masked"
    with torch.inference_mode():
        masked = m(x)
    torch.testing.assert_close(fast, masked, rtol=1e-4, atol=1e-5)
    clone = copy.deepcopy(m)
    assert not any("_bn_folds" in mod.__dict__ for mod in clone.modules())

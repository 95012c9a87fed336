"""Second review of the compiled kernels: the build cache, bit-exact copies, checks that hold for empty outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynsparse import kernels
from dynsparse.errors import DynsparseError

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"no kernels: {kernels.why_unavailable()}")
needs_compiler = pytest.mark.skipif(
    kernels.load() is None or kernels._compiler() is None, reason="needs the kernels and a C compiler"
)


def _cached_library(monkeypatch, tmp_path) -> Path:
    """Build the library into ``tmp_path`` (the cache dir) and return its path."""
    monkeypatch.setenv("DYNSPARSE_CACHE_DIR", str(tmp_path))
    lib, why = kernels._build.__wrapped__()
    assert lib is not None, why
    (built,) = (tmp_path / "kernels").iterdir()
    return built


def _replace(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file: truncating the library this process has mapped would kill it."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@needs_compiler
def test_a_cached_library_cut_short_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """A library cut short (a crash before its data reached the disk, an interrupted copy of the cache) killed the
    process with SIGBUS at its first kernel use, on every run; it is rebuilt instead."""
    built = _cached_library(monkeypatch, tmp_path)
    whole = built.read_bytes()
    _replace(built, whole[: len(whole) // 2])
    code = "from dynsparse import kernels; print(kernels.load() is not None, kernels.why_unavailable())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert run.stdout.startswith("True"), run.stdout
    assert built.stat().st_size == len(whole)


@needs_compiler
def test_an_empty_cached_library_is_rebuilt(monkeypatch, tmp_path):
    """An empty file in the cache ("file too short") turned the kernels off for good, until deleted by hand."""
    built = _cached_library(monkeypatch, tmp_path)
    _replace(built, b"")
    lib, why = kernels._build.__wrapped__()
    assert lib is not None, why
    assert built.stat().st_size > 0


def test_a_failed_compiler_run_says_how_it_ended(monkeypatch, tmp_path):
    """A compiler that fails without a word (killed, out of memory) left why_unavailable ending in ': '."""
    false = kernels.shutil.which("false")
    if false is None:
        pytest.skip("needs the false command")
    monkeypatch.setattr(kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("DYNSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", false)
    lib, why = kernels._build.__wrapped__()
    assert lib is None and "exit status 1" in why, why
    assert list((tmp_path / "kernels").iterdir()) == []  # no temporary file left behind


@needs_kernels
@pytest.mark.parametrize(
    "rows,cols",
    [([9], []), ([], [16]), ([], [3, 1]), ([-1], []), ([], [-1])],
    ids=["bad-row", "bad-col", "unsorted-cols", "negative-row", "negative-col"],
)
def test_bad_indices_are_refused_when_the_other_selection_is_empty(rows, cols):
    """The kernel checks the indices, but an empty output returned before the kernel ran: bad indices passed."""
    w = torch.randn(8, 16, 3, 3)
    with pytest.raises(DynsparseError, match=r"conv_gather: filter indices must lie in \[0, 8\)"):
        kernels.conv_gather(w, torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64))


@needs_kernels
def test_empty_selections_with_good_indices_give_empty_weights():
    w = torch.randn(8, 16, 3, 3)
    none = torch.empty(0, dtype=torch.int64)
    assert kernels.conv_gather(w, none, torch.tensor([1, 15])).shape == (0, 2, 3, 3)
    assert kernels.conv_gather(w, torch.tensor([7, 0]), none).shape == (2, 0, 3, 3)
    assert kernels.conv_gather(w, none, None, torch.ones(8)).shape == (0, 16, 3, 3)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@needs_kernels
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_copy_without_scale_keeps_every_bit(fmt, k):
    """Without a scale the kernel multiplied by 1: denormals became 0 under ``torch.set_flush_denormal(True)``, a
    signalling NaN turned quiet; PyTorch indexing copies the bits."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(6, 20, k, k, generator=g)
    flat = w.view(-1)
    flat[::3] = 1e-40  # denormal
    flat[1::7] = -0.0
    flat[2::11] = torch.tensor([0x7FA00000], dtype=torch.int32).view(torch.float32)  # a signalling NaN
    w = w.contiguous(memory_format=fmt)
    rows, cols = torch.tensor([5, 0, 2]), torch.tensor([0, 3, 8, 9, 19])
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for r, c in ((rows, cols), (None, cols), (rows, None)):
            want = w if r is None else w[r]
            want = want if c is None else want[:, c]
            assert torch.equal(_bits(kernels.conv_gather(w, r, c)), _bits(want)), (r is None, c is None)
    finally:
        torch.set_flush_denormal(False)


@needs_kernels
def test_a_scaled_copy_still_multiplies_once():
    w = torch.randn(6, 20, 3, 3).contiguous(memory_format=torch.channels_last)
    scale = torch.randn(6)
    scale[1] = 1.0
    rows, cols = torch.tensor([1, 4]), torch.tensor([2, 17])
    assert torch.equal(kernels.conv_gather(w, rows, cols, scale), w[rows][:, cols] * scale[rows].view(-1, 1, 1, 1))


@needs_kernels
@pytest.mark.parametrize("act", [1.0, "relu", None])
def test_an_activation_code_that_is_not_an_integer_is_refused_by_name(act):
    """``act=1.0`` passed the check and failed in ctypes: 'argument 13: TypeError: wrong type'."""
    g = torch.Generator().manual_seed(0)
    wg, w2, x = torch.randn(7, 33, generator=g), torch.randn(5, 7, generator=g), torch.randn(33, generator=g)
    packed = kernels.pack_neurons(type("Owner", (), {})(), wg, None, w2)
    with torch.inference_mode(), pytest.raises(DynsparseError, match="neuron_rows: act must be one of"):
        kernels.neuron_rows(packed, x, torch.tensor([0, 2]), c_in=33, has_g=True, has_v=False, act=act)
    with torch.inference_mode(), pytest.raises(DynsparseError, match="cats_rows: act must be one of"):
        kernels.cats_rows(wg, None, x, 0.1, torch.empty(7, 5).copy_(w2.t()), has_v=False, act=act)

"""Optional compiled CPU kernels, built on first use with the system C compiler (no torch headers, ~0.5 s).

Stock PyTorch has no copy-free "matrix-vector product over these rows" on the CPU, which is what a single
token through an MLP with per-token neuron sets (CATS, Deja Vu) needs. `neuron_rows` runs such an MLP from a
packed copy of its weights (`pack_neurons`): each kept neuron's producer rows and consumer column lie next to
each other, so one token reads one contiguous stream per kept neuron and nothing else.

`conv_gather` copies a conv weight's kept filters and input channels in one pass, the BatchNorm scale folded in
on the way (per-input channel gating runs a conv on the channels this input keeps).

The C sources ship in the package (``neuron_rows.c``, ``conv_gather.c``). They are compiled into one library in
``$DYNSPARSE_CACHE_DIR`` (default ``~/.cache/dynsparse/kernels``), keyed by a hash of sources, compiler and flags;
the write is atomic, and a library found cut short is rebuilt. Where there is no compiler, no AVX2 + FMA (x86-64),
or ``DYNSPARSE_NO_KERNELS=1``, `load` returns None and callers use their PyTorch path; `why_unavailable` says why.
The kernels run only in eager CPU float32 inference: under autograd, a dispatch mode (FLOP counters,
``torch.export``), tracing or ``torch.compile`` the callers take the PyTorch path, which gives the same result up
to float rounding (tested).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import numbers
import os
import shlex
import shutil
import struct
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..errors import DynsparseError

__all__ = [
    "act_code",
    "cats_rows",
    "conv_gather",
    "eager_cpu",
    "load",
    "neuron_rows",
    "pack_neurons",
    "why_unavailable",
]

log = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).with_name(n) for n in ("neuron_rows.c", "conv_gather.c"))
_ACT = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


def _compiler() -> list[str] | None:
    """The C compiler command, every word of it (``CC="ccache gcc"``, sysconfig's ``"gcc -pthread"``), or None."""
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        words = shlex.split(cc) if cc else []
        if words and shutil.which(words[0]):
            return words
    return None


def _flags() -> list[str]:
    return ["-O3", "-std=c99", "-shared", "-fPIC", "-mavx2", "-mfma"]


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("DYNSPARSE_NO_KERNELS", "") not in ("", "0"):
        return None, "DYNSPARSE_NO_KERNELS is set"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):  # the scalar loops were never measured faster than PyTorch
        return None, f"the kernels need AVX2 and FMA (x86-64); this CPU reports {capability}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    flags = _flags()
    source = b"".join(src.read_bytes() for src in _SOURCES)
    key = hashlib.sha256(source + " ".join(cc).encode() + " ".join(flags).encode()).hexdigest()[:16]
    try:
        root = Path(os.environ.get("DYNSPARSE_CACHE_DIR") or Path.home() / ".cache" / "dynsparse") / "kernels"
    except RuntimeError as e:  # no home directory
        return None, f"no cache directory ({e}); set DYNSPARSE_CACHE_DIR"
    lib = root / f"dynsparse-{key}.so"
    try:
        if not _whole(lib):  # missing, or cut short: rebuilt (loading a library cut short kills the process)
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            try:
                run = subprocess.run(
                    [*cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
                )
                if run.returncode != 0:
                    names = ", ".join(src.name for src in _SOURCES)
                    said = run.stderr.strip()[:500] or "no message"  # killed (out of memory) or a silent wrapper
                    return None, f"{cc[0]} failed on {names} (exit status {run.returncode}): {said}"
                os.chmod(tmp, 0o755)  # mkstemp makes it 0600: others sharing the cache could not load it
                with open(tmp, "rb") as f:  # on disk before the rename: a crash must not leave a library cut short
                    os.fsync(f.fileno())
                os.replace(tmp, lib)  # atomic: another process sees the old state or the whole library
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build or load {lib}: {e}"
    f = dll.ds_neuron_rows
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f.argtypes = [p, i64, p, i64, i64, p, i64, i32, i32, p, p, p, i32, p]
    f.restype = None
    f = dll.ds_cats_rows
    f.argtypes = [p, i64, p, p, i64, i64, ctypes.c_float, i32, p, i64, i32, p, i64, p, p, p]
    f.restype = i64
    f = dll.ds_conv_gather
    f.argtypes = [p, i64, i64, i64, i32, p, i64, p, i64, p, p]
    f.restype = i32
    log.debug("dynsparse kernels: loaded %s", lib)
    return dll, ""


def _whole(lib: Path) -> bool:
    """False where ``lib`` is missing, shorter than an ELF header, or an ELF file shorter than its own header says (a
    linker writes the section headers last): cut short by a crash before its data reached the disk, or by an
    interrupted copy of the cache. Loading it would fail for good ("file too short") or kill the process with
    SIGBUS; it is rebuilt instead. A file in another format (not 64-bit little-endian ELF) is left to the loader."""
    try:
        with open(lib, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return False
    if len(head) < 64:
        return False
    if not head.startswith(b"\x7fELF\x02\x01"):
        return True
    (shoff,) = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    return size >= shoff + shentsize * shnum


def load() -> ctypes.CDLL | None:
    """The compiled kernel library (built on first call), or None where it cannot be built."""
    return _build()[0]


def why_unavailable() -> str:
    """Why `load` returns None ("" when the kernels are available)."""
    return _build()[1]


def act_code(act: nn.Module) -> int | None:
    """The kernel's code for an activation module (ReLU, GELU exact / tanh, SiLU, Identity), else None."""
    if type(act) is nn.ReLU:
        return _ACT["relu"]
    if type(act) is nn.GELU:
        return _ACT["gelu"] if act.approximate == "none" else _ACT["gelu_tanh"]
    if type(act) is nn.SiLU:
        return _ACT["silu"]
    if type(act) is nn.Identity:
        return _ACT["identity"]
    return None


def eager_cpu(*tensors: Tensor) -> bool:
    """True where a kernel may run: plain float32 CPU tensors, no autograd, no dispatch mode, not compiling.

    Not while tracing or scripting either (``torch.jit.trace``, the TorchScript ONNX exporter): a tracer does not
    see a ctypes call, and the traced graph would keep an uninitialised output.
    """
    if torch.is_grad_enabled() or is_in_torch_dispatch_mode() or torch.compiler.is_compiling():
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return all(
        type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


def pack_neurons(owner: object, w_g: Tensor | None, w_v: Tensor | None, w_out: Tensor) -> Tensor:
    """Rows ``[w_g[i] | w_v[i] | w_out[:, i]]`` per neuron (H, parts), cached on ``owner`` until a weight changes.

    ``w_g`` / ``w_v``: (H, C_in) producer weights or None; ``w_out``: the (C_out, H) consumer weight. A change is
    seen when a weight is replaced (a new Parameter, ``w.data = ...``, ``.to(...)``) or changed in place through
    ops that bump its version (``copy_`` / ``mul_`` under ``no_grad``, ``load_state_dict``); an in-place change
    through ``w.data`` (``w.data.mul_(2)``) is not (``.data`` has its own version counter), nor a fused optimizer's
    step (``fused=True`` does not bump versions; the neuron-gated MLPs drop their caches on every ``train()`` /
    ``eval()`` switch for that): clear the cache with ``owner._packed_src = None`` after one. Inference tensors
    (weights made under ``inference_mode``) have no version counter: their pack is rebuilt on every call.
    """
    parts = [w for w in (w_g, w_v) if w is not None]
    if not _cache_valid(getattr(owner, "_packed_src", None), (*parts, w_out)):
        with torch.inference_mode(False), torch.no_grad():
            owner._packed = torch.cat([*(w.detach() for w in parts), w_out.detach().t()], 1).contiguous()
        owner._packed_src = _cache_key((*parts, w_out))
    return owner._packed


def _root(t: Tensor) -> Tensor:
    """The tensor that owns ``t``'s memory: ``t`` itself, or the base of a view (a fresh view per call, such as
    the halves of a ``GluMlp``'s ``fc1.weight``, still maps to the one parameter)."""
    return t if t._base is None else t._base


def _cache_key(sources: tuple[Tensor, ...]) -> tuple:
    """The owning tensors themselves, a weak reference to each one's storage (``w.data = ...`` swaps the storage of
    the same tensor, and the freed address may come back: the storage itself must match), their versions (shared
    by views), and each source's address, shape and strides. None (nothing may be cached) where a source is an
    inference tensor (made under ``inference_mode``): it has no version counter, an in-place change is not seen."""
    if any(t.is_inference() for t in sources):
        return None
    return tuple(
        (_root(t), StorageWeakRef(t.untyped_storage()), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        for t in sources
    )


def _cache_valid(key: tuple | None, sources: tuple[Tensor, ...]) -> bool:
    """True when ``key`` (from `_cache_key`) was made from these very tensors (or views of the same memory,
    placed the same way), unchanged since."""
    if key is None or len(key) != len(sources) or any(t.is_inference() for t in sources):
        return False
    return all(
        k[0] is _root(t)
        and _same_storage(k[1], t)
        and k[2:] == (t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        for k, t in zip(key, sources, strict=True)
    )


def _same_storage(ref: StorageWeakRef, t: Tensor) -> bool:
    """True when ``t`` still lives in the storage ``ref`` points to (a live weak reference keeps the storage's
    identity from being reused by a new one)."""
    return not ref.expired() and ref.cdata == t.untyped_storage()._cdata


def neuron_rows(
    packed: Tensor,
    x: Tensor,
    idx: Tensor,
    *,
    c_in: int,
    has_g: bool,
    has_v: bool,
    g_pre: Tensor | None = None,
    b_g: Tensor | None = None,
    b_v: Tensor | None = None,
    act: int = 0,
) -> Tensor:
    """``Σ_{i ∈ idx} h_i · w_out[:, i]`` for one token ``x`` (C_in,) from `pack_neurons`' rows: (1, C_out).

    ``h_i = act(w_g[i]·x + b_g[i]) · (w_v[i]·x + b_v[i])`` (parts absent where ``has_g`` / ``has_v`` are
    False; without ``has_g``, ``g_pre`` (len(idx),) gives the activated gate values). Call only when `load`
    is not None and `eager_cpu` holds.
    """
    owner = "dynsparse.kernels.neuron_rows"
    n_in = c_in * (int(has_g) + int(has_v))
    lib = _check(owner, packed, None, x, n_in, c_in, b_g, b_v, g_pre=g_pre)
    _check_indices(owner, idx=idx)
    _check_act(owner, act)
    if not has_g and (g_pre is None or g_pre.numel() != idx.numel()):
        raise DynsparseError(f"{owner}: without has_g, g_pre must give one value per kept neuron")
    if idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < packed.shape[0]:
        raise DynsparseError(f"{owner}: neuron indices out of range [0, {packed.shape[0]})")
    c_out = packed.shape[1] - n_in
    x = x.contiguous()
    idx = idx.to(torch.int64).contiguous()
    if g_pre is not None:
        g_pre = g_pre.contiguous()
    b_g = None if b_g is None else b_g.contiguous()
    b_v = None if b_v is None else b_v.contiguous()
    y = torch.empty(1, c_out, dtype=torch.float32)

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    lib.ds_neuron_rows(
        packed.data_ptr(), packed.stride(0), x.data_ptr(), c_in, c_out, idx.data_ptr(), idx.numel(),
        int(has_g), int(has_v), ptr(g_pre), ptr(b_g), ptr(b_v), act, y.data_ptr(),
    )  # fmt: skip
    return y


def cats_rows(
    w_g: Tensor,
    b_g: Tensor | None,
    x: Tensor,
    threshold: float,
    packed: Tensor,
    *,
    has_v: bool,
    b_v: Tensor | None = None,
    act: int = 0,
) -> Tensor:
    """CATS on one token ``x`` (C_in,): keep the neurons with ``|act(w_g[i]·x + b_g[i])| ≥ threshold``, run them.

    ``threshold = -inf`` keeps every neuron (NaN activations included, as the PyTorch path at ``keep = 1``).
    ``w_g`` (H, C_in) with unit column stride is read whole (four rows at a time); ``packed`` holds the rows
    ``[w_v[i] | w_out[:, i]]`` (`pack_neurons` without ``w_g``), or ``w_out``'s transpose when not ``has_v``.
    Returns (1, C_out). Call only when `load` is not None and `eager_cpu` holds.
    """
    owner = "dynsparse.kernels.cats_rows"
    if w_g.dim() != 2 or w_g.stride(1) != 1:
        raise DynsparseError(f"{owner}: w_g must be (H, C_in) with unit column stride, got {tuple(w_g.shape)}")
    h, c_in = w_g.shape
    n_in = c_in if has_v else 0
    lib = _check(owner, packed, h, x, n_in, c_in, b_g, b_v, w_g=w_g)
    if math.isnan(threshold):
        raise DynsparseError(f"{owner}: threshold is NaN (an uncalibrated gate?)")
    _check_act(owner, act)
    c_out = packed.shape[1] - n_in
    x = x.contiguous()
    b_g = None if b_g is None else b_g.contiguous()
    b_v = None if b_v is None else b_v.contiguous()
    idx = torch.empty(h, dtype=torch.int64)
    g = torch.empty(h, dtype=torch.float32)
    y = torch.empty(1, c_out, dtype=torch.float32)
    lib.ds_cats_rows(
        w_g.data_ptr(), w_g.stride(0), None if b_g is None else b_g.data_ptr(), x.data_ptr(), c_in, h,
        float(threshold), act, packed.data_ptr(), packed.stride(0), int(has_v),
        None if b_v is None else b_v.data_ptr(), c_out, idx.data_ptr(), g.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y


def _library(owner: str, **tensors: Tensor | None) -> ctypes.CDLL:
    """The library, once every given tensor is float32 on the CPU (`DynsparseError` naming the argument)."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"{owner}: kernels unavailable ({why_unavailable()})")
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise DynsparseError(f"{owner}: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return lib


def _check_act(owner: str, act: int) -> None:
    """``act`` must be one of the kernel's codes, as an integer (``1.0 == 1``, but ctypes refuses a float)."""
    if not isinstance(act, numbers.Integral) or act not in _ACT.values():
        raise DynsparseError(f"{owner}: act must be one of {sorted(_ACT.values())} (see act_code), got {act!r}")


def _check_indices(owner: str, **indices: Tensor | None) -> None:
    """Index tensors must be int32 / int64 on the CPU, as ``index_select`` takes them (a bool keep mask or float
    values would otherwise be converted to indices silently, another device's pointer read as host memory)."""
    for name, t in indices.items():
        if t is not None and (t.dtype not in (torch.int32, torch.int64) or t.device.type != "cpu"):
            raise DynsparseError(
                f"{owner}: {name} must be an integer CPU tensor (int32 / int64), got {t.dtype} on {t.device}"
            )


def _check(
    owner: str,
    packed: Tensor,
    h: int | None,
    x: Tensor,
    n_in: int,
    c_in: int,
    b_g: Tensor | None,
    b_v: Tensor | None,
    **more: Tensor | None,
) -> ctypes.CDLL:
    """The library, after the checks both entry points share (raising `DynsparseError` naming the argument).

    ``packed`` must be (H, > n_in) with unit column stride (H = ``h`` when given), ``x`` must hold ``c_in``
    values, the biases one value per neuron, and every tensor (``more`` included) must be float32 on the CPU.
    """
    lib = _library(owner, packed=packed, x=x, b_g=b_g, b_v=b_v, **more)
    rows = "H" if h is None else str(h)
    bad_rows = h is not None and packed.dim() == 2 and packed.shape[0] != h
    if packed.dim() != 2 or packed.stride(1) != 1 or packed.shape[1] <= n_in or bad_rows:
        raise DynsparseError(
            f"{owner}: packed must be ({rows}, parts) with unit column stride and more than {n_in} columns, got "
            f"shape {tuple(packed.shape)}, strides {packed.stride()}"
        )
    if x.numel() != c_in:
        raise DynsparseError(f"{owner}: x must have c_in = {c_in} values, got {x.numel()}")
    for name, t in (("b_g", b_g), ("b_v", b_v)):
        if t is not None and t.numel() != packed.shape[0]:
            raise DynsparseError(f"{owner}: {name} must have one value per neuron ({packed.shape[0]}), got {t.numel()}")
    return lib


def conv_gather(w: Tensor, rows: Tensor | None, cols: Tensor | None, scale: Tensor | None = None) -> Tensor:
    """``w[rows][:, cols] * scale[rows]`` (per filter) in one pass, for a conv weight (O, I, kh, kw) or a matrix (O, I).

    ``rows``: kept filters (any order) or None (all); ``cols``: kept input channels, strictly increasing, or None;
    ``scale``: one factor per filter of ``w`` (O values; each kept filter gets its own), or None. The result is laid
    out like ``w`` (channels-last stays channels-last). Equals the PyTorch indexing exactly (one multiply per
    value; without ``scale`` the bits are copied, denormals and NaN payloads too). Call only when `load` is not
    None and `eager_cpu` holds; ``w`` must be contiguous in either memory format.
    """
    owner = "dynsparse.kernels.conv_gather"
    lib = _library(owner, w=w, scale=scale)
    _check_indices(owner, rows=rows, cols=cols)
    if w.dim() not in (2, 4):
        raise DynsparseError(f"{owner}: w must be (O, I) or (O, I, kh, kw), got shape {tuple(w.shape)}")
    o, i = w.shape[:2]
    kh, kw = w.shape[2:] if w.dim() == 4 else (1, 1)
    k = kh * kw
    standard = w.is_contiguous()
    if standard:
        last = k == 1  # (O, I, 1, 1) is stored as (O, I): the packed path
    elif w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        last = True
    else:
        raise DynsparseError(f"{owner}: w must be contiguous or channels-last contiguous, got strides {w.stride()}")
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    cols = None if cols is None else cols.to(torch.int64).contiguous()
    nr = o if rows is None else rows.numel()
    nc = i if cols is None else cols.numel()
    if scale is not None and scale.numel() != o:
        raise DynsparseError(f"{owner}: scale must have one value per filter of w ({o}), got {scale.numel()}")
    scale = None if scale is None else scale.contiguous()
    if standard:  # the standard strides (a 1x1 weight's are those of the (O, I) matrix it is stored as)
        out = torch.empty(nr, nc, *w.shape[2:], dtype=torch.float32)
    else:
        out = torch.empty(nr, kh, kw, nc, dtype=torch.float32).permute(0, 3, 1, 2)
    bad = f"{owner}: filter indices must lie in [0, {o}) and input channels be strictly increasing in [0, {i})"
    if out.numel() == 0:  # an empty index tensor may have a null data pointer, which the kernel reads as "all"
        if not _gather_indices_valid(rows, o, cols, i):  # the kernel's check, which does not run here
            raise DynsparseError(bad)
        return out

    def ptr(t: Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    rc = lib.ds_conv_gather(w.data_ptr(), o, k, i, int(last), ptr(rows), nr, ptr(cols), nc, ptr(scale), out.data_ptr())
    if rc != 0:
        raise DynsparseError(bad)
    return out


def _gather_indices_valid(rows: Tensor | None, o: int, cols: Tensor | None, i: int) -> bool:
    """True when ``rows`` lie in [0, o) and ``cols`` are strictly increasing in [0, i) (None: all), as
    ``ds_conv_gather`` checks them."""
    if rows is not None and rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < o:
        return False
    if cols is not None and cols.numel():
        cols = cols.reshape(-1)
        return int(cols[0]) >= 0 and int(cols[-1]) < i and bool((cols.diff() > 0).all())
    return True

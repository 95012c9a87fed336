"""A small, dependency-free reader and writer of the IDX format of (Fashion-)MNIST, plain or gzipped.

An IDX file is a 4-byte magic number ``00 00 TT NN`` (``TT`` the element type, ``NN`` the number of
dimensions), ``NN`` big-endian uint32 dimension sizes, then the elements in row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DataFormatError, DataNotFoundError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytearray:
    """The file's bytes, gunzipped when the file starts with the gzip magic (whatever its extension)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"IDX file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise DataFormatError(f"IDX file {str(path)!r} is a directory") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(f"IDX file {str(path)!r}: corrupt or truncated gzip stream ({exc})") from None
    return bytearray(raw)


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (``.gz`` or plain; gzip is detected from the content, not the name).

    Args:
        path: The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        A tensor of the file's shape and element type in native byte order: ``(N, H, W)`` uint8 for an
        image file, ``(N,)`` uint8 for a label file.

    Raises:
        DataNotFoundError: The file does not exist.
        DataFormatError: Bad magic number, unknown element type, truncated data or trailing bytes; the
            message names the file.

    Examples:
        >>> images = read_idx("train-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        (torch.Size([60000, 28, 28]), torch.uint8)
    """
    path = Path(path)
    buf = _read_bytes(path)
    name = str(path)
    if len(buf) < 4:
        raise DataFormatError(f"IDX file {name!r} is too short for a header ({len(buf)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", bytes(buf[:4]))
    if zero != 0 or type_code not in IDX_DTYPES:
        raise DataFormatError(
            f"IDX file {name!r} has a bad magic number 0x{bytes(buf[:4]).hex()} "
            f"(expected 0x0000TTNN with type TT in {sorted(f'{t:02x}' for t in IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DataFormatError(f"IDX file {name!r} declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataFormatError(f"IDX file {name!r} is truncated inside its header ({len(buf)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", bytes(buf[4:header]))
    dtype = IDX_DTYPES[type_code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(buf) != expected:
        what = "truncated" if len(buf) < expected else "longer than its header says"
        raise DataFormatError(
            f"IDX file {name!r} is {what}: shape {list(shape)} of {dtype.name} needs {expected} bytes, found {len(buf)}"
        )
    array = np.frombuffer(buf, dtype=dtype, offset=header).reshape(shape)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return torch.from_numpy(array)


def write_idx(path: str | os.PathLike, data: torch.Tensor | np.ndarray, compress: bool | None = None) -> Path:
    """Write ``data`` as an IDX file (the inverse of `read_idx`).

    Args:
        path: Destination; gzipped when ``compress`` is true, or when it is None and the name ends in ``.gz``.
        data: A tensor or array of at least one dimension, of uint8, int8, int16, int32, float32 or float64.
        compress: Force or forbid gzip.

    Returns:
        The path written.
    """
    path = Path(path)
    array = data.numpy(force=True) if isinstance(data, torch.Tensor) else np.asarray(data)
    by_kind = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
    code = by_kind.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.ndim == 0:
        raise DataFormatError(f"cannot write {array.dtype} array of shape {array.shape} to IDX file {str(path)!r}")
    payload = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload += np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path

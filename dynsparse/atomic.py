"""Atomic file writes: a crash leaves the last good file, never a half-written one."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]

_TRIES = 100


def _new_temp(path: Path) -> str:
    """Create an empty temporary file next to ``path`` with the mode a plain ``open(path, "w")`` would give it.

    ``tempfile.mkstemp`` creates its file with mode 0600; here the file is created with 0666 and the kernel applies
    the umask (and a directory's default ACL), as it does for any new file.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TRIES):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path}: no free temporary file name next to it after {_TRIES} tries")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, rename it over ``path``, fsync the
    directory (so that the rename, too, survives a crash once this returns).

    The new file gets the permissions a plain ``open(path, "w")`` would give it: those of the file it replaces,
    or for a new file 0666 less the umask. A symbolic link at ``path`` is followed, as ``open(path, "w")`` follows
    it: the file it points to is replaced and the link kept.

    Returns:
        ``path``, as given.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # a `latest.pt -> run3/ckpt.pt` link stays
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _new_temp(target)
    except OSError as e:  # name the user's path, not a temporary file's
        raise _naming(e, target) from e
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 less the umask
        write(tmp)  # may replace the file (safetensors writes a new one with mode 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if target.exists():  # replacing a file: keep its mode, as writing into it would
            mode = stat.S_IMODE(os.stat(target).st_mode)
        os.chmod(tmp, mode)
        try:
            os.replace(tmp, target)
        except OSError as e:  # e.g. ``path`` is a directory
            raise _naming(e, target) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(target.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk; skipped where a directory cannot be opened or
    synced (Windows, some network file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise type(e)(e.errno, e.strerror, str(directory)) from e  # fsync's error names no file
    finally:
        os.close(fd)


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` as the same kind of error about ``path`` (the file the caller asked for) where it named a temporary file
    of it (``.NAME.*.tmp`` next to it); other errors as they are."""
    names = [Path(f) for f in (e.filename, e.filename2) if isinstance(f, (str, os.PathLike))]
    if not any(n.parent == path.parent and n.name.startswith(f".{path.name}.") for n in names):
        return e
    return type(e)(e.errno, e.strerror, str(path))

"""Atomic writes: the new file gets the permissions of a plain open() (umask, or the mode of the file replaced)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from dynsparse.atomic import atomic_write
from dynsparse.convert.io import _FORMAT, atomic_save_tensors


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _save_text(p: Path) -> Path:
    return atomic_write(p, lambda tmp: Path(tmp).write_text("x"))


def _save_tensors(p: Path) -> Path:
    return atomic_save_tensors({"w": torch.ones(3)}, p, {"format": _FORMAT})


WRITERS = pytest.mark.parametrize("write", [_save_text, _save_tensors], ids=["text", "safetensors"])


@WRITERS
def test_new_file_respects_umask(tmp_path, umask_027, write):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "out.bin"
    write(target)
    assert _mode(target) == _mode(plain) == 0o640


@WRITERS
def test_replaced_file_keeps_its_mode(tmp_path, umask_027, write):
    target = tmp_path / "out.bin"
    target.write_text("old")
    os.chmod(target, 0o604)
    write(target)
    assert _mode(target) == 0o604


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def boom(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_errors_name_the_path_asked_for_not_a_temporary_file(tmp_path):
    from dynsparse.atomic import atomic_write

    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "sub").mkdir()
    # a parent that is a file (the error names it), a target that is a directory (the error names the target)
    for target, named in ((blocker / "m.bin", blocker), (tmp_path / "sub", tmp_path / "sub")):
        with pytest.raises(OSError) as info:
            atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
        assert info.value.filename == str(named) and ".tmp" not in str(info.value), info.value
    assert blocker.read_text() == "x" and not list(tmp_path.glob(".*.tmp"))

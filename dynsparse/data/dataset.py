"""The in-memory image dataset every loader returns, and the one-time float conversion behind it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError

__all__ = ["ImageBatch", "ImageTensorDataset", "channel_stats", "prepare_images"]

# ITU-R 601-2 luma, the weights PIL uses for ``convert("L")``.
_LUMA = (0.299, 0.587, 0.114)


def _size_pair(image_size: int | Sequence[int] | None, field: str = "image_size") -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        pair = (image_size, image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(isinstance(s, int) for s in image_size):
        pair = (int(image_size[0]), int(image_size[1]))
    else:
        raise ConfigError(f"{field} must be an int or an (H, W) pair of ints, got {image_size!r}")
    if min(pair) < 1:
        raise ConfigError(f"{field} must be positive, got {image_size!r}")
    return pair


def channel_stats(
    mean: Sequence[float], std: Sequence[float], channels: int | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``mean``/``std`` after changing the channel count as `prepare_images` does.

    Gray to RGB repeats the value; RGB to gray takes the luma-weighted sum (exact for the mean, the usual
    approximation for the std).
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if channels is None or channels == len(mean):
        return mean, std
    if channels == 3 and len(mean) == 1:
        return mean * 3, std * 3
    if channels == 1 and len(mean) == 3:
        luma_mean = sum(w * m for w, m in zip(_LUMA, mean, strict=True))
        luma_std = sum(w * s for w, s in zip(_LUMA, std, strict=True))
        return (luma_mean,), (luma_std,)
    raise ConfigError(f"channels must be 1 or 3 (from {len(mean)} native channels), got {channels!r}")


def prepare_images(
    images: Tensor,
    *,
    scale: float = 255.0,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Turn raw images into model-ready float32 images, once.

    Steps: divide by ``scale`` (to ``[0, 1]``); RGB to gray with the ITU-R 601-2 luma weights if asked; resize
    with bilinear ``F.interpolate`` (antialiased when shrinking); normalize ``(x - mean) / std`` per channel; gray
    to RGB as a stride-0 ``expand`` view (no extra memory) if asked.

    Args:
        images: ``(N, C, H, W)`` or ``(N, H, W)`` raw values (e.g. uint8).
        scale: The value that maps to 1.0 (255 for 8-bit images, 16 for scikit-learn's digits).
        image_size: Output ``H = W`` or ``(H, W)``; None keeps the native size.
        channels: Output channels, 1 or 3; None keeps the native count.
        mean: Per-native-channel mean (in ``[0, 1]`` units), or None to skip normalization.
        std: Per-native-channel std, given together with ``mean``.

    Returns:
        ``(N, channels, H', W')`` float32, on the device of ``images``. Does not modify ``images``.

    Examples:
        >>> x = prepare_images(torch.full((2, 28, 28), 255, dtype=torch.uint8), image_size=32, channels=3)
        >>> tuple(x.shape), float(x.max())
        ((2, 3, 32, 32), 1.0)
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ConfigError(f"images must be (N, C, H, W) or (N, H, W), got shape {tuple(images.shape)}")
    in_chans = images.shape[1]
    if (mean is None) != (std is None):
        raise ConfigError("mean and std must be given together")
    if mean is not None and std is not None and (len(mean) != in_chans or len(std) != in_chans):
        raise ConfigError(f"mean/std need {in_chans} values (one per channel), got {list(mean)} / {list(std)}")
    stats = channel_stats(mean or (0.0,) * in_chans, std or (1.0,) * in_chans, channels)
    x = images.to(torch.float32, copy=True).div_(scale)  # a copy: the in-place ops below never touch `images`
    if channels == 1 and in_chans == 3:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(_LUMA, dtype=x.dtype, device=x.device)).unsqueeze(1)
    size = _size_pair(image_size)
    if size is not None and tuple(x.shape[-2:]) != size:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    if mean is not None:
        c = x.shape[1]
        mean_t, std_t = (torch.tensor(s[:c], device=x.device).view(1, -1, 1, 1) for s in stats)
        x.sub_(mean_t).div_(std_t)
    if channels == 3 and in_chans == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


class ImageBatch(Sequence):
    """A fetched batch: reads as a sequence of ``(image, label)`` samples, holds them as two stacked tensors.

    `ImageTensorDataset.__getitems__` returns one, so a plain ``DataLoader`` with the default collate still works
    (it iterates the samples), while `make_loader`'s collate hands out ``images`` and ``labels`` without the
    per-sample split and re-stack.

    Attributes:
        images: ``(B, C, H, W)`` float32.
        labels: ``(B,)`` int64.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:  # type: ignore[override]
        return self.images[i], int(self.labels[i])


class ImageTensorDataset(Dataset):
    """Images and labels held in memory as ready float tensors (a `TensorDataset` with metadata).

    Args:
        images: ``(N, C, H, W)`` float32, already resized and normalized (see `prepare_images`).
        labels: ``(N,)`` integer class indices.
        classes: Class names, index ``i`` naming label ``i``.
        mean: The per-channel mean that was subtracted (empty when not normalized), for un-normalizing.
        std: The per-channel std that was divided by.
        name: Dataset name, for ``repr`` and errors.
        split: ``"train"`` or ``"test"``.

    Returns (per item):
        ``(image, label)``: a ``(C, H, W)`` float32 view into ``images`` (do not modify it in place) and an int.

    Examples:
        >>> ds = ImageTensorDataset(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), classes=["a", "b"])
        >>> image, label = ds[1]
        >>> tuple(image.shape), label
        ((1, 8, 8), 1)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str] | None = None,
        *,
        mean: Sequence[float] = (),
        std: Sequence[float] = (),
        name: str = "",
        split: str = "",
    ) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"dataset {name!r}: images must be (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        n = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(n)]
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.name = name
        self.split = split

    @property
    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(images, labels)``, like `torch.utils.data.TensorDataset.tensors`."""
        return self.images, self.labels

    @property
    def targets(self) -> Tensor:
        """The labels, under torchvision's name."""
        return self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> ImageBatch:
        """Fetch a whole batch with one indexing op (used by ``DataLoader``); ``(B, C, H, W)`` copies."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageBatch(self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image=({c}, {h}, {w}), classes={self.num_classes})"
        )

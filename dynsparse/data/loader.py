"""Seeded, resumable data loaders: the order of an epoch depends only on ``(seed, epoch)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from ..errors import ConfigError
from .dataset import ImageBatch

__all__ = ["EpochSampler", "collate", "make_loader", "set_epoch"]


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by a permutation that depends only on ``seed + epoch`` (or in order).

    The single-process twin of `DistributedSampler`: same ``set_epoch`` and the same permutation as a
    one-replica `DistributedSampler` with the same seed, so a resumed run that calls ``set_epoch(epoch)`` sees the
    same order as the original run.

    Args:
        data_source: The dataset (only its length is used).
        shuffle: Permute each epoch; when false, ``set_epoch`` is accepted and changes nothing.
        seed: Base seed.
    """

    def __init__(self, data_source: Sequence[Any] | Dataset, shuffle: bool = True, seed: int = 0) -> None:
        self.n = len(data_source)  # type: ignore[arg-type]
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def collate(batch: Any) -> Any:
    """``default_collate``, with a fast path for an `ImageBatch` (already stacked): returns ``[images, labels]``."""
    if isinstance(batch, ImageBatch):
        return [batch.images, batch.labels]
    return default_collate(batch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    *,
    num_workers: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` whose order is a function of ``(seed, epoch)``, for reproducible and resumable training.

    The sampler is an `EpochSampler` (or, when ``distributed``, a seeded `DistributedSampler`); call
    ``set_epoch(loader, epoch)`` (or ``loader.sampler.set_epoch(epoch)``) before each epoch. Batches of an
    `ImageTensorDataset` are fetched with one indexing op per batch and come out as ``[images (B, C, H, W),
    labels (B,) int64]``.

    Args:
        dataset: Any map-style dataset.
        batch_size: Samples per batch (per process when distributed).
        shuffle: Permute the order each epoch.
        seed: Base seed of the permutation (and of the workers' seeds).
        distributed: Shard with `DistributedSampler` (needs an initialized process group unless ``num_replicas``
            and ``rank`` are given). Its ``drop_last`` is set to ``drop_last`` too: false pads the shards by
            repeating samples so that every rank has the same length.
        drop_last: Drop the last incomplete batch.
        num_workers: Worker processes (0: load in the main process, the right choice for in-memory tensors).
        num_replicas: World size for ``distributed`` (default: from the process group).
        rank: This process's rank for ``distributed`` (default: from the process group).
        pin_memory: Pin batches for faster host-to-GPU copies.

    Returns:
        The loader; ``loader.sampler`` has ``set_epoch``.

    Examples:
        >>> from dynsparse.data import load_dataset
        >>> loader = make_loader(load_dataset("digits"), batch_size=64, seed=0)
        >>> set_epoch(loader, 3)
        >>> images, labels = next(iter(loader))
        >>> tuple(images.shape), labels.dtype
        ((64, 1, 8, 8), torch.int64)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    if distributed:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    else:
        if num_replicas is not None or rank is not None:
            raise ConfigError("make_loader: num_replicas and rank are only used with distributed=True")
        sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the order of ``epoch`` in a loader from `make_loader` (or any loader whose sampler has ``set_epoch``).

    Like ``DistributedSampler.set_epoch`` (whose name it keeps), it changes the sampler's state and returns None.

    Raises:
        ConfigError: The loader's sampler has no ``set_epoch`` (e.g. a plain ``DataLoader(shuffle=True)``, whose
            order depends on how many epochs ran before, not on the epoch number).
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return
    raise ConfigError(
        f"set_epoch: the loader's sampler {type(getattr(loader, 'sampler', None)).__name__} has no set_epoch; "
        "build the loader with dynsparse.data.make_loader"
    )

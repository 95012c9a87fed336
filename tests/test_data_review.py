"""Review regressions of the data, models, modules and pretrained helpers."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynsparse.data import DataNotFoundError, load_dataset
from dynsparse.errors import ConfigError, DynsparseError
from dynsparse.models import LeNet5, create_model
from dynsparse.modules import inputs_to_device_of, replace_module_


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("explicit", [False, True], ids=["one-folder", "train-test"])
def test_image_folder_refuses_a_class_without_images(tmp_path: Path, explicit: bool) -> None:
    # torchvision's ImageFolder refuses it too: the model would get an output for a class it never sees
    base = tmp_path / "train" if explicit else tmp_path
    for i in range(10):
        _png(base / "cat" / f"{i}.png", i)
    (base / "dog").mkdir()
    (base / "dog" / "a.gif").write_bytes(b"GIF89a")  # not an image extension read here
    if explicit:
        _png(tmp_path / "test" / "cat" / "0.png", 0)
    for split in ("train", "test"):
        with pytest.raises(DataNotFoundError, match=r"classes \['dog'\] have no images") as info:
            load_dataset("image-folder", split, root=tmp_path)
        assert str(base / "dog") in str(info.value)


def test_image_folder_test_split_may_lack_a_class(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        _png(tmp_path / "train" / cls / "0.png", 1)
    _png(tmp_path / "test" / "cat" / "0.png", 1)
    test = load_dataset("image-folder", "test", root=tmp_path)
    assert test.classes == ["cat", "dog"] and test.labels.tolist() == [0]


@pytest.mark.parametrize("size", [8, 12, 14, 15])
def test_lenet5_refuses_images_too_small_at_construction(size: int) -> None:
    with pytest.raises(ConfigError, match=r"lenet5.*img_size.*16"):
        LeNet5(img_size=size)
    with pytest.raises(ConfigError, match="img_size"):
        create_model("lenet5", img_size=size)


def test_lenet5_smallest_image() -> None:
    assert LeNet5(img_size=16)(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_inputs_to_device_of_keeps_namedtuples() -> None:
    pair = collections.namedtuple("pair", "x mask")
    model = nn.Linear(2, 2).to("meta")
    out = inputs_to_device_of(model, [pair(torch.zeros(1), torch.ones(1))])
    assert type(out[0]) is pair and out[0].x.device.type == "meta" and out[0].mask.device.type == "meta"


def test_replace_module_refuses_a_missing_child() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    with pytest.raises(DynsparseError, match=r"'1\.relu'.*no child 'relu'"):
        replace_module_(model, "1.relu", nn.Identity())
    assert len(model[1]) == 1 and not hasattr(model[1], "relu")
    replace_module_(model, "1.0", nn.Identity())
    assert isinstance(model[1][0], nn.Identity)


def test_image_folder_symlink_loop_reads_each_image_once(tmp_path: Path) -> None:
    # os.walk(followlinks=True) followed a link to '.' about 40 levels deep: each image ~40 times, in both splits
    for cls in ("a", "b"):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png", 10 * i)
    (tmp_path / "a" / "self").symlink_to(".")
    (tmp_path / "b" / "sub").mkdir()
    _png(tmp_path / "b" / "sub" / "s.png", 7)
    (tmp_path / "b" / "sub" / "up").symlink_to("..")
    train = load_dataset("image-folder", "train", root=tmp_path)
    test = load_dataset("image-folder", "test", root=tmp_path)
    assert len(train) + len(test) == 11
    assert torch.bincount(torch.cat([train.labels, test.labels])).tolist() == [5, 6]


@pytest.mark.parametrize("kwargs", [{"channels": 1}, {"channels": 1, "mean": (0.5,) * 3, "std": (0.2,) * 3}])
def test_prepare_images_keeps_the_device_of_the_images(kwargs: dict) -> None:
    # the luma weights and the mean/std were CPU tensors: a CUDA batch failed (meta stands in for the GPU here)
    from dynsparse.data import prepare_images

    out = prepare_images(torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="meta"), **kwargs)
    assert out.device.type == "meta" and tuple(out.shape) == (2, 1, 4, 4)

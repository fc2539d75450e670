"""Data edge cases users hit with their own data: odd image folders, odd image modes, odd settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.config import ConfigError
from cifarlab.data import CifarDataModule, DataError, load_imagefolder
from tests.test_data import write_cifar_archive

SHADES = {"ant": 10, "bee": 120, "cow": 240}  # each class one flat grey level, so labels can be checked


def write_classes(folder: Path, classes, per_class: int = 4) -> None:
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (SHADES[cls],) * 3).save(folder / cls / f"{i}.png")


@pytest.mark.parametrize("cache", [False, True])
def test_a_test_folder_with_fewer_classes_keeps_the_training_labels(tmp_path, cache):
    write_classes(tmp_path / "train", ["ant", "bee", "cow"])
    write_classes(tmp_path / "test", ["ant", "cow"])  # no bee images to test on
    dm = CifarDataModule(
        "imagefolder",
        root=str(tmp_path / "train"),
        val_size=3,
        cache_dir=tmp_path / "cache" if cache else None,
    )
    dm.setup()
    images, labels = dm.splits["test"]
    classes = ["ant", "bee", "cow"]
    for image, label in zip(images, labels, strict=True):
        assert SHADES[classes[int(label)]] == int(image[0, 0, 0])  # cow is 2 here, as in train/, not 1


def test_a_test_folder_with_a_class_train_lacks_is_named(tmp_path):
    write_classes(tmp_path / "train", ["ant", "bee"])
    write_classes(tmp_path / "test", ["ant", "bee", "cow"])
    dm = CifarDataModule("imagefolder", root=str(tmp_path / "train"), val_size=3)
    with pytest.raises(
        DataError,
        match=r"test/cow: class folder 'cow' is not allowed .*allowed: the 2 class folders of data.root \(ant, bee\)",
    ):
        dm.setup()


def test_a_root_named_test_is_not_its_own_test_split(tmp_path):
    write_classes(tmp_path / "test", ["ant", "bee"], per_class=10)
    dm = CifarDataModule("imagefolder", root=str(tmp_path / "test"), val_size=3, test_size=4)
    dm.setup()
    assert [len(dm.splits[s][1]) for s in ("train", "val", "test")] == [13, 3, 4]  # held out, not reused


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    write_classes(tmp_path / "train", ["ant", "bee"], per_class=1)
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(tmp_path / "train" / "ant" / "deep.png")
    assert Image.open(tmp_path / "train" / "ant" / "deep.png").mode == "I;16"
    images, _, _ = load_imagefolder(tmp_path / "train", 32)
    assert torch.all(images[1] == 40000 >> 8)  # 156 in every channel; convert("RGB") alone gives 255


def test_wide_integer_or_float_pixels_are_named(tmp_path):
    write_classes(tmp_path / "train", ["ant", "bee"], per_class=1)
    Image.fromarray(np.full((32, 32), 1000.0, np.float32)).save(tmp_path / "train" / "bee" / "float.tif")
    with pytest.raises(DataError, match=r"bee/float.tif cannot be decoded .*outside 0\.\.255.*8-bit"):
        load_imagefolder(tmp_path / "train", 32)


def test_a_broken_symlink_is_named_with_the_cache_on(tmp_path):
    """Datasets kept in git-annex or DVC, or on a disk that is not mounted: links to missing files."""
    write_classes(tmp_path / "train", ["ant", "bee"], per_class=2)
    (tmp_path / "train" / "bee" / "lost.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(
        DataError, match=r"bee/lost.png cannot be (read|decoded).*remove or replace that file"
    ):
        load_imagefolder(tmp_path / "train", 32, tmp_path / "cache")


def test_num_classes_below_the_class_folders_is_refused(tmp_path):
    write_classes(tmp_path / "train", ["ant", "bee", "cow"])
    with pytest.raises(ConfigError, match=r"data.num_classes=2 is not allowed; allowed: .*>= 3"):
        CifarDataModule("imagefolder", root=str(tmp_path / "train"), num_classes=2)
    assert CifarDataModule("imagefolder", root=str(tmp_path / "train"), num_classes=5).num_classes == 5


def test_cifar_with_another_image_size_is_refused(tmp_path):
    write_cifar_archive(tmp_path)
    with pytest.raises(ConfigError, match=r"data.image_size=64 is not allowed; allowed: 32"):
        CifarDataModule("cifar10", data_dir=str(tmp_path), download=False, image_size=64)


def test_a_split_smaller_than_the_devices_is_refused(tmp_path):
    dm = CifarDataModule("synthetic", val_size=1, train_size=50, test_size=8, batch_size=4)
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        global_rank=0,
        world_size=2,
        current_epoch=0,
        lightning_module=None,
    )
    assert len(dm.train_dataloader()) == 6  # 49 images: 24 per device, in batches of 4
    with pytest.raises(DataError, match=r"data.val_size=1 .*2 devices"):
        dm.val_dataloader()


def test_too_few_images_for_a_held_out_test_split_is_refused(tmp_path):
    write_classes(tmp_path / "train", ["ant", "bee"], per_class=2)  # a fifth of 4 images: none to test on
    with pytest.raises(DataError, match=r"has 4 images, too few to hold out a test split"):
        CifarDataModule("imagefolder", root=str(tmp_path / "train"), val_size=1).setup()

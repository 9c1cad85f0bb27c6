"""Folder data sets: every good image is seen once per epoch with its class, a corrupt one is skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lbc.data import build_datasets, build_loader, build_mixup
from lbc.errors import ConfigError, DataError

CLASSES = ["ant", "bee", "cat"]


def make_tree(root: Path, per_class: dict[str, int], split: str) -> None:
    """``per_class[c]`` images of class ``c``, each filled with grey level 40 * (index of c + 1)."""
    for c, n in per_class.items():
        (root / split / c).mkdir(parents=True)
        level = 40 * (CLASSES.index(c) + 1)
        for i in range(n):
            ext = ".png" if i % 2 else ".JPEG"
            Image.fromarray(np.full((20 + i, 24, 3), level, np.uint8)).save(root / split / c / f"{i}{ext}")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_tree(tmp_path, {"ant": 3, "bee": 4, "cat": 2}, "train")
    make_tree(tmp_path, {"ant": 1, "cat": 2}, "val")  # val classes are a subset
    (tmp_path / "train" / "bee" / "x.JPEG").write_bytes(np.random.default_rng(0).bytes(300))  # corrupt
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def _epoch(loader):
    images, labels = [], []
    for batch in loader:
        if batch is not None:
            images.append(batch[0])
            labels.append(batch[1])
    return torch.cat(images), torch.cat(labels)


def test_full_epoch_sees_every_good_image_and_skips_the_corrupt_one(tree, caplog):
    ds = build_datasets("folder", root=str(tree), image_size=16, num_classes=3, input_size=[3, 16, 16])
    assert ds.num_classes == 3 and ds.train.classes == CLASSES and ds.val.classes == CLASSES
    assert len(ds.train) == 10  # 9 images + the corrupt file; notes.txt is not an image
    train = build_loader(ds.train, batch_size=4, train=True, workers=0, seed=0, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="lbc.data.folder"):
        images, labels = _epoch(train)
    assert train.num_samples == 10 and len(labels) == 9  # one skipped
    assert sum("x.JPEG" in r.getMessage() for r in caplog.records) == 1
    assert sorted(labels.tolist()) == [0] * 3 + [1] * 4 + [2] * 2
    assert images.shape[1:] == (3, 16, 16)

    val = build_loader(ds.val, batch_size=2, train=False, workers=0, seed=0)
    images, labels = _epoch(val)
    assert val.num_samples == len(labels) == 3 and labels.tolist() == [0, 2, 2]
    # Labels follow the pixels: un-normalise the centre pixel's red channel back to the grey level.
    grey = (images[:, 0, 8, 8] * 0.229 + 0.485) * 255
    assert torch.allclose(grey, 40.0 * (labels + 1).float(), atol=2)


def test_workers_skip_the_corrupt_image_too(tree):
    ds = build_datasets("folder", root=str(tree), image_size=16)
    loader = build_loader(ds.train, batch_size=3, train=True, workers=2, seed=1, drop_last=False)
    assert len(_epoch(loader)[1]) == 9


def test_a_batch_of_only_corrupt_images_is_none(tmp_path):
    make_tree(tmp_path, {"ant": 1}, "train")
    make_tree(tmp_path, {"ant": 1}, "val")
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(b"\x89PNG garbage")
    ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    batches = list(build_loader(ds.train, batch_size=1, train=False, workers=0, seed=0))
    assert sum(b is None for b in batches) == 1 and len(batches) == 2


def test_deit_recipe_transforms_and_mixup(tree):
    ds = build_datasets("folder", root=str(tree), image_size=16, interpolation="bicubic",
                        rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    x, y = next(iter(build_loader(ds.train, batch_size=5, train=True, workers=0, seed=0)))
    assert x.shape == (5, 3, 16, 16) and y.shape == (5,)
    mix = build_mixup(mixup=0.8, cutmix=1.0, label_smoothing=0.1, num_classes=3)
    mx, my = mix(x, y)  # odd batch: loses its last sample instead of failing
    assert mx.shape == (4, 3, 16, 16) and my.shape == (4, 3)
    assert torch.allclose(my.sum(1), torch.ones(4)) and my.min() > 0  # soft, smoothed targets
    assert build_mixup(mixup=0.0, cutmix=0.0, label_smoothing=0.1, num_classes=3) is None


def test_missing_root_is_a_data_error_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match=str(missing)):
        build_datasets("folder", root=str(missing))


def test_missing_or_empty_split_is_a_data_error(tmp_path):
    make_tree(tmp_path, {"ant": 1}, "train")
    with pytest.raises(DataError, match=r"val: missing"):
        build_datasets("folder", root=str(tmp_path))
    (tmp_path / "val" / "ant").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val: no images"):
        build_datasets("folder", root=str(tmp_path))


def test_val_class_unknown_to_train_is_a_data_error(tree):
    make_tree(tree, {"bee": 1}, "extra")
    (tree / "extra" / "dog").mkdir()
    with pytest.raises(DataError, match="dog"):
        build_datasets("folder", root=str(tree), val_split="extra")


def test_wrong_num_classes_and_interpolation_are_config_errors(tree):
    with pytest.raises(ConfigError, match="data.num_classes=1000"):
        build_datasets("folder", root=str(tree), num_classes=1000)
    with pytest.raises(ConfigError, match="data.interpolation='cubicle'"):
        build_datasets("folder", root=str(tree), interpolation="cubicle")

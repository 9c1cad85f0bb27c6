"""Folder data sets (timm's reader): every good image is seen once per epoch with its class; a corrupt one is
skipped and counted once, by the loader, with or without workers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lbc.data import build_datasets, build_loader, build_mixup
from lbc.engine.loop import evaluate
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
    images, labels = zip(*loader, strict=True)  # the loader never yields an empty batch (None)
    return torch.cat(images), torch.cat(labels)


def test_full_epoch_sees_every_good_image_and_skips_the_corrupt_one(tree, caplog):
    ds = build_datasets("folder", root=str(tree), image_size=16, num_classes=3, input_size=[3, 16, 16])
    assert ds.num_classes == 3 and ds.train.classes == CLASSES and ds.val.classes == CLASSES
    assert len(ds.train) == 10  # 9 images + the corrupt file; notes.txt is not an image
    train = build_loader(ds.train, batch_size=4, train=True, workers=0, seed=0, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="lbc.data.folder"):
        images, labels = _epoch(train)
    assert train.skipped == 1 and len(labels) == 9  # one skipped
    assert sum("x.JPEG" in r.getMessage() for r in caplog.records) == 1
    assert sorted(labels.tolist()) == [0] * 3 + [1] * 4 + [2] * 2
    assert images.shape[1:] == (3, 16, 16)

    val = build_loader(ds.val, batch_size=2, train=False, workers=0, seed=0)
    images, labels = _epoch(val)
    assert val.skipped == 0 and len(labels) == 3 and labels.tolist() == [0, 2, 2]
    # Labels follow the pixels: un-normalise the centre pixel's red channel back to the grey level.
    grey = (images[:, 0, 8, 8] * 0.229 + 0.485) * 255
    assert torch.allclose(grey, 40.0 * (labels + 1).float(), atol=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_corrupt_image_is_counted_once_per_epoch(tree, workers):
    ds = build_datasets("folder", root=str(tree), image_size=16)
    loader = build_loader(ds.train, batch_size=3, train=True, workers=workers, seed=1, drop_last=False)
    for epoch in range(2):  # the count is per epoch, not a running total
        loader.set_epoch(epoch)
        assert len(_epoch(loader)[1]) == 9 and loader.skipped == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_reports_the_loaders_count_once(tmp_path, workers):
    make_tree(tmp_path, {"ant": 2, "bee": 2}, "train")
    make_tree(tmp_path, {"ant": 2, "bee": 3}, "val")
    (tmp_path / "val" / "bee" / "bad.png").write_bytes(b"\x89PNG garbage")
    ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    val = build_loader(ds.val, batch_size=2, train=False, workers=workers, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    stats = evaluate(model, val, torch.device("cpu"))
    assert stats["val_skipped"] == 1 == val.skipped


def test_a_batch_of_only_corrupt_images_is_not_yielded(tmp_path):
    make_tree(tmp_path, {"ant": 1}, "train")
    make_tree(tmp_path, {"ant": 1}, "val")
    (tmp_path / "train" / "ant" / "bad.png").write_bytes(b"\x89PNG garbage")
    ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    assert ds.train[1] is None  # not timm's retry of the next image, which would show 0.JPEG twice
    loader = build_loader(ds.train, batch_size=1, train=False, workers=0, seed=0)
    batches = list(loader)
    assert len(loader) == 2 and len(batches) == 1 and loader.skipped == 1


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


def test_images_outside_class_folders_are_a_data_error(tree):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "train" / "stray.png")
    with pytest.raises(DataError, match=r"train: holds images outside class folders"):
        build_datasets("folder", root=str(tree))


def test_val_labels_index_the_train_classes(tmp_path):
    make_tree(tmp_path, {"ant": 1, "bee": 1, "cat": 1}, "train")
    make_tree(tmp_path, {"cat": 2}, "val")  # on its own, val would call cat class 0
    ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    assert [label for _, label in ds.val.reader.samples] == [2, 2] and ds.val.classes == CLASSES


def test_val_class_unknown_to_train_is_a_data_error(tree):
    make_tree(tree, {"bee": 1}, "extra")
    (tree / "extra" / "dog").mkdir()  # empty: not a class (timm's reader), so no error yet
    assert build_datasets("folder", root=str(tree), val_split="extra").val.classes == CLASSES
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "extra" / "dog" / "0.png")
    with pytest.raises(DataError, match=r"extra: class folders \['dog'\] \(1 in all\) are not among the train classes"):
        build_datasets("folder", root=str(tree), val_split="extra")


def test_an_empty_train_class_folder_is_refused(tree):
    (tree / "train" / "dog").mkdir()  # would silently not be a class: every later label would shift
    with pytest.raises(DataError, match=r"train: class folders without images: \[.dog.\] \(1 in all\)"):
        build_datasets("folder", root=str(tree))


def test_wrong_num_classes_and_interpolation_are_config_errors(tree):
    with pytest.raises(ConfigError, match="data.num_classes=1000"):
        build_datasets("folder", root=str(tree), num_classes=1000)
    with pytest.raises(ConfigError, match="data.interpolation='cubicle'"):
        build_datasets("folder", root=str(tree), interpolation="cubicle")
    with pytest.raises(ConfigError, match="data.rand_augment='rand-x9'"):
        build_datasets("folder", root=str(tree), rand_augment="rand-x9")


# --- directory symlinks: loops are not followed, a class folder elsewhere is ----------------------------


def _links(tmp_path: Path) -> Path:
    """train: ant and bee, 8 images each (16), val: 2 ant; returns the train folder."""
    make_tree(tmp_path, {"ant": 8, "bee": 8}, "train")
    make_tree(tmp_path, {"ant": 2}, "val")
    return tmp_path / "train"


@pytest.mark.parametrize(("link", "target"), [
    ("ant/loop", "."),  # a class folder holding a link to itself
    ("bee/up", ".."),  # ... to the split
    ("ant/root", "../.."),  # ... to the data root, above the split
    ("again", "."),  # a link at the top of the split, to the split
    ("ant/bees", "../bee"),  # into the split: bee's images under another name
])
def test_a_symlink_loop_does_not_add_images_or_classes(tmp_path, caplog, link, target):
    train = _links(tmp_path)
    (train / link).symlink_to(target, target_is_directory=True)
    assert (train / link).is_dir()  # a real link that resolves
    with caplog.at_level(logging.WARNING, logger="lbc.data.folder"):
        ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    assert len(ds.train) == 16 and ds.train.classes == ["ant", "bee"] and ds.num_classes == 2
    assert sorted(label for _, label in ds.train.reader.samples) == [0] * 8 + [1] * 8
    assert all(link.split("/")[-1] not in Path(p).relative_to(train).parts for p, _ in ds.train.reader.samples)
    warned = [r.getMessage() for r in caplog.records if "not following the symlink" in r.getMessage()]
    assert len(warned) == 1 and str(train / link) in warned[0]


def test_a_symlinked_class_folder_elsewhere_is_followed_once(tmp_path, caplog):
    train = _links(tmp_path)
    make_tree(tmp_path / "disk2", {"cat": 3}, "images")  # a class folder on another disk
    (train / "cat").symlink_to(tmp_path / "disk2" / "images" / "cat", target_is_directory=True)
    elsewhere = tmp_path / "disk2" / "images" / "cat"
    (elsewhere / "self").symlink_to(".", target_is_directory=True)  # a loop inside the followed folder
    make_tree(tmp_path / "disk3", {"cat": 1}, "x")  # two folders elsewhere that link to each other
    (elsewhere / "x").symlink_to(tmp_path / "disk3" / "x", target_is_directory=True)
    (tmp_path / "disk3" / "x" / "cat" / "back").symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="lbc.data.folder"):
        ds = build_datasets("folder", root=str(tmp_path), image_size=8)
    assert ds.train.classes == ["ant", "bee", "cat"]
    cats = [p for p, label in ds.train.reader.samples if label == 2]
    assert len(ds.train) == 16 + 3 + 1 and len(cats) == 4  # cat's 3 and the 1 behind x/cat, each once
    assert sum(Path(p).parent == train / "cat" for p in cats) == 3
    assert sum("not following the symlink" in r.getMessage() for r in caplog.records) == 2  # self, back


def test_find_images_matches_timms_walk_without_links(tree):
    from timm.data.readers.reader_image_folder import find_images_and_targets

    from lbc.data.folder import IMAGE_EXTENSIONS, find_images

    for split in ("train", "val"):
        samples, classes, skipped = find_images(str(tree / split))
        assert (samples, classes) == find_images_and_targets(str(tree / split), types=IMAGE_EXTENSIONS)
        assert skipped == []

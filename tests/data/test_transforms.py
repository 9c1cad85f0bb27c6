"""The folder recipes are timm's: the DeiT preset builds exactly DeiT's ``create_transform`` call."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from lbc.data import build_datasets
from tests.data.test_folder import make_tree
from tests.helpers import compose_config

# DeiT's main.py defaults and datasets.build_transform, written out as DeiT writes them.
DEIT_TRAIN = dict(input_size=224, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                  interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
DEIT_EVAL = transforms.Compose([
    transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def datasets_from(tmp_path, *overrides: str):
    make_tree(tmp_path, {"ant": 1, "bee": 1}, "train")
    make_tree(tmp_path, {"bee": 1}, "val")
    data = OmegaConf.to_container(compose_config([*overrides, f"data.root={tmp_path}", "data.num_classes=2"]).data,
                                  resolve=True)
    data.pop("loader"), data.pop("augment")
    return build_datasets(**data)


def outputs(transform, image: Image.Image, seeds=range(6)) -> list[torch.Tensor]:
    """The transform's outputs with torch, random and numpy seeded alike before each call."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        out.append(transform(image))
    return out


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), np.uint8))


def test_deit_preset_train_transform_is_deits_create_transform(tmp_path, image):
    ds = datasets_from(tmp_path, "experiment=deit_small_imagenet")
    ours, deit = ds.train.transform, create_transform(**DEIT_TRAIN)
    assert repr(ours) == repr(deit)
    assert "RandAugment" in repr(ours) and "RandomErasing(p=0.25, mode=pixel" in repr(ours)
    assert "ColorJitter" not in repr(ours)  # timm turns DeiT's 0.3 off under RandAugment
    mine, theirs = outputs(ours, image), outputs(deit, image)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
    assert not torch.equal(mine[0], mine[1])  # the seeds do matter: the comparison is not vacuous


def test_deit_preset_val_transform_is_deits_eval_transform(tmp_path, image):
    ds = datasets_from(tmp_path, "experiment=deit_small_imagenet")
    (ours,), (deit,) = outputs(ds.val.transform, image, [0]), outputs(DEIT_EVAL, image, [0])
    assert ours.shape == (3, 224, 224) and torch.equal(ours, deit)


def test_standard_recipe_is_timms_crop_and_flip_without_colour_jitter(tmp_path, image):
    ds = datasets_from(tmp_path, "data=imagenet")
    timm_plain = create_transform(224, is_training=True, color_jitter=None)
    assert repr(ds.train.transform) == repr(timm_plain) and "ColorJitter" not in repr(timm_plain)
    assert all(torch.equal(a, b) for a, b in zip(outputs(ds.train.transform, image), outputs(timm_plain, image),
                                                 strict=True))


def test_added_keys_reach_timm(tmp_path):
    ds = datasets_from(tmp_path, "data=imagenet", "data.image_size=32", "data.crop_pct=1.0", "data.hflip=0.0",
                       "data.color_jitter=0.4", "data.scale=[0.5,1.0]", "data.mean=[0.5,0.5,0.5]")
    train, val = repr(ds.train.transform), repr(ds.val.transform)
    assert "Resize(size=32," in val and "scale=(0.5, 1.0)" in train and "ColorJitter" in train
    assert "HorizontalFlip" not in train and "mean=tensor([0.5000, 0.5000, 0.5000])" in train + val

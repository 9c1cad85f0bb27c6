"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), upscaled, in memory: a CPU-sized task."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lbc.data.base import Datasets, check_declared

VAL_SIZE = 360  # of 1797: train 1437, val 360, stratified
SPLIT_SEED = 0  # fixed: the split is part of the data set, not of the run


class TensorImages(Dataset):
    """Grey images kept as one (N, 1, H, W) tensor; items repeat them to ``channels`` and may transform."""

    def __init__(self, images: Tensor, labels: Tensor, channels: int = 3, transform: Callable | None = None) -> None:
        self.images, self.labels, self.channels, self.transform = images, labels, channels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].expand(self.channels, -1, -1)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def digits_split(labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """The fixed stratified (train, val) indices into ``load_digits()``: identical on every call and machine."""
    train, val = train_test_split(range(len(labels)), test_size=VAL_SIZE, stratify=labels, random_state=SPLIT_SEED)
    return sorted(train), sorted(val)


def upscaled_digits(image_size: int) -> tuple[Tensor, Tensor, tuple[list[int], list[int]], tuple[Tensor, Tensor]]:
    """``(images, labels, (train, val), (mean, std))``: the grey digits as (N, 1, H, W) in 0-1 (levels 0-16),
    upscaled bilinearly to ``image_size``, and the train split's one mean and std (what the items are
    normalised by; an export's preprocessing reads them from here)."""
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    train, val = digits_split(digits.target)
    return images, torch.as_tensor(digits.target, dtype=torch.long), (train, val), (images[train].mean(), images[train].std())


def build_digits(
    image_size: int = 32,
    train_augment: bool = False,
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
) -> Datasets:
    """Digits resized to ``image_size``, 3 channels, normalised by the train split's mean and std.

    ``train_augment`` adds a small random affine (+-10 degrees, 10% shift, 0.9-1.1 scale) to train items.
    """
    images, labels, (train, val), (mean, std) = upscaled_digits(image_size)
    images = (images - mean) / std
    augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if train_augment else None
    found = Datasets(
        train=TensorImages(images[train], labels[train], transform=augment),
        val=TensorImages(images[val], labels[val]),
        num_classes=10,
        input_size=(3, image_size, image_size),
    )
    return check_declared(found, num_classes, input_size, "the digits data set")

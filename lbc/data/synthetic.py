"""Random tensors of any shape, deterministic per index: for benchmarks and smoke runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lbc.data.base import Datasets


class RandomImages(Dataset):
    """Item ``i`` is N(0, 1) noise of ``input_size`` and a uniform label, both from a generator seeded ``seed + i``."""

    def __init__(self, size: int, input_size: Sequence[int], num_classes: int, seed: int) -> None:
        self.size, self.input_size, self.num_classes, self.seed = size, tuple(input_size), num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed + index)
        image = torch.randn(self.input_size, generator=g)
        return image, int(torch.randint(self.num_classes, (), generator=g))


def build_synthetic(
    input_size: Sequence[int] = (3, 224, 224),
    num_classes: int = 1000,
    train_size: int = 1024,
    val_size: int = 256,
    seed: int = 0,
) -> Datasets:
    """Train items use seeds ``seed + i``, val items ``seed + train_size + i``: no item appears in both."""
    return Datasets(
        train=RandomImages(train_size, input_size, num_classes, seed),
        val=RandomImages(val_size, input_size, num_classes, seed + train_size),
        num_classes=num_classes,
        input_size=tuple(input_size),
    )

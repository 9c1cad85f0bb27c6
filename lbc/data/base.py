"""The ``Datasets`` bundle every data set builder returns, and the check of declared config facts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from lbc.errors import ConfigError


@dataclass
class Datasets:
    """Train and val splits plus the facts a model needs; items are ``(float tensor CxHxW, int label)``."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]


def check_declared(found: Datasets, num_classes: int | None, input_size: Sequence[int] | None, where: str) -> Datasets:
    """Raise ConfigError when ``data.num_classes`` / ``data.input_size`` (if given) disagree with ``found``."""
    if num_classes is not None and num_classes != found.num_classes:
        raise ConfigError(f"data.num_classes={num_classes} but {where} has {found.num_classes} classes")
    if input_size is not None and tuple(input_size) != found.input_size:
        raise ConfigError(f"data.input_size={list(input_size)} but {where} gives {list(found.input_size)}")
    return found

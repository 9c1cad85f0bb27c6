"""ImageNet-layout folders ``root/<split>/<class>/<image>``; unreadable images become None, never a crash."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lbc.data.base import Datasets, check_declared
from lbc.data.transforms import train_transform, val_transform
from lbc.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_split(split_dir: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class folders of ``split_dir`` and its (path, label) samples; labels index ``classes`` if given."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing; expected a folder with one sub-folder of images per class")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir}: class folders {unknown[:5]} ({len(unknown)} in all) are not among the train classes")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        files = sorted(e.name for e in os.scandir(split_dir / c) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        samples += [(str(split_dir / c / f), index[c]) for f in files]
    if not samples:
        raise DataError(f"{split_dir}: no images; expected <class>/<image>{'|'.join(IMAGE_EXTENSIONS)}")
    return list(classes), samples


class ImageFiles(Dataset):
    """(path, label) samples read with PIL as RGB; an image that fails to open or decode gives None (one warning)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None) -> None:
        self.samples, self.classes, self.transform = samples, classes, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, label = self.samples[index]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")  # forces the full decode inside the try
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            return None
        return (self.transform(image) if self.transform else image), label


def build_folder(
    root: str,
    image_size: int = 224,
    train_split: str = "train",
    val_split: str = "val",
    interpolation: str = "bilinear",
    rand_augment: str | None = None,
    reprob: float = 0.0,
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
) -> Datasets:
    """Train and val from ``root/<train_split>`` and ``root/<val_split>``; classes are the sorted train folders."""
    root_dir = Path(root).expanduser()
    if not root_dir.is_dir():
        raise DataError(f"data.root={root}: no such folder; expected {root}/{train_split}/<class>/<image>")
    classes, train = scan_split(root_dir / train_split)
    _, val = scan_split(root_dir / val_split, classes)
    found = Datasets(
        train=ImageFiles(train, classes, train_transform(image_size, interpolation, rand_augment, reprob)),
        val=ImageFiles(val, classes, val_transform(image_size, interpolation)),
        num_classes=len(classes),
        input_size=(3, image_size, image_size),
    )
    return check_declared(found, num_classes, input_size, str(root_dir / train_split))

"""ImageNet-layout folders ``root/<split>/<class>/<image>``, read with timm's folder reader and ImageDataset.

The images and their classes follow timm's ``ReaderImageFolder`` (a recursive walk, a class is the leaf
folder holding images, classes in natural sort order, samples sorted by path), except for directory
symlinks: timm's walk follows every one, so a link back to the split or one of its parents repeats the
tree until the path is too long (16 images became 976, with the link's name as an extra class).
:func:`find_images` follows a link that points elsewhere (a class folder on another disk, as before)
and skips, with one warning each, a link into the split itself (its images are walked anyway) and a
link to a folder already on the walked path (a loop). What we add on top: one-line DataErrors for a
missing root/split or an empty one, val labels that index the *train* classes (val classes must be
among them), and an unreadable image gives None instead of timm's silent retry of the next index, so
the loader can count it as skipped and no image is seen twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch import Tensor

from lbc.data.base import Datasets, check_declared
from lbc.data.transforms import train_transform, val_transform
from lbc.errors import DataError

log = logging.getLogger(__name__)

# timm's default is .png/.jpg/.jpeg only; its reader takes the list as ``input_key`` ("a;b;c").
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def find_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                ) -> tuple[list[tuple[str, int]], dict[str, int], list[str]]:
    """(samples, class_to_idx, skipped links) of ``folder``, as timm's ``find_images_and_targets`` finds
    them (leaf folder name = class, classes and samples in natural sort order) without its loops.

    A directory symlink is followed when it points outside ``folder``, unless its target is already on
    the walked path (a loop); one into ``folder`` (or to ``folder`` or a parent of it) is skipped, with
    one warning: the walk reaches those images by their own path, so the link would add them again
    under its name. ``skipped`` holds the paths of the links not followed.
    """
    top = os.path.realpath(folder)
    types = {e.lower() for e in extensions}
    chains = {folder: {top}}  # each walked folder: the real paths of it and the folders above it
    filenames, labels, skipped = [], [], []
    for root, subdirs, files in os.walk(folder, topdown=True, followlinks=True):
        chain = chains.pop(root)
        kept = []
        for name in sorted(subdirs):
            path = os.path.join(root, name)
            real = os.path.realpath(path)
            if real in chain or (os.path.islink(path) and (_inside(real, top) or _inside(top, real))):
                what = "a loop" if real in chain or _inside(top, real) else f"inside {folder}, walked anyway"
                log.warning("not following the symlink %s -> %s (%s)", path, real, what)
                skipped.append(path)
                continue
            chains[path] = chain | {real}
            kept.append(name)
        subdirs[:] = kept
        label = os.path.basename(os.path.relpath(root, folder)) if root != folder else ""
        for f in files:
            if os.path.splitext(f)[1].lower() in types:
                filenames.append(os.path.join(root, f))
                labels.append(label)
    class_to_idx = {c: i for i, c in enumerate(sorted(set(labels), key=natural_key))}
    samples = sorted(((f, class_to_idx[c]) for f, c in zip(filenames, labels, strict=True)),
                     key=lambda s: natural_key(s[0]))
    return samples, class_to_idx, skipped


class FolderReader(ReaderImageFolder):
    """timm's folder reader (``__getitem__``, file names) over :func:`find_images` instead of timm's walk."""

    def __init__(self, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        Reader.__init__(self)  # not ReaderImageFolder's: that walks with every symlink followed
        self.root = root
        self.samples, self.class_to_idx, self.skipped_links = find_images(root, extensions)


def read_split(split_dir: Path, classes: Sequence[str] | None = None) -> ReaderImageFolder:
    """The folder reader for ``split_dir``; with ``classes`` (the train classes) its labels index those."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing; expected a folder with one sub-folder of images per class")
    reader = FolderReader(str(split_dir))
    if not reader.samples:
        raise DataError(f"{split_dir}: no images; expected <class>/<image>{'|'.join(IMAGE_EXTENSIONS)}")
    if "" in reader.class_to_idx:
        raise DataError(f"{split_dir}: holds images outside class folders; expected <class>/<image>")
    holding = {Path(path).relative_to(split_dir).parts[0] for path, _ in reader.samples}
    links = {Path(p).name for p in reader.skipped_links if Path(p).parent == split_dir}  # not classes: warned
    empty = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in holding | links)
    if empty and classes is None:  # the train split defines the classes: a dropped one shifts every label
        # (torchvision's ImageFolder refuses these too; a val split may lack some classes' images)
        raise DataError(f"{split_dir}: class folders without images: {empty[:5]} ({len(empty)} in all); "
                        "remove them or add their images")
    if classes is not None:
        unknown = sorted(set(reader.class_to_idx) - set(classes))
        if unknown:
            raise DataError(f"{split_dir}: class folders {unknown[:5]} ({len(unknown)} in all) are not among the train classes")
        index = {c: i for i, c in enumerate(classes)}
        to_train = {i: index[c] for c, i in reader.class_to_idx.items()}
        reader.samples = [(path, to_train[label]) for path, label in reader.samples]
        reader.class_to_idx = index
    return reader


class ImageFiles(ImageDataset):
    """timm's ImageDataset, except that an image that fails to open or decode gives None (one warning).

    timm retries the next index instead, which shows that image twice and hides the failure from any
    count; None lets the loader's collate drop it and count it (``EpochLoader.skipped``).
    """

    def __init__(self, reader: ReaderImageFolder, transform: Callable | None = None) -> None:
        super().__init__(reader.root, reader=reader, transform=transform)

    @property
    def classes(self) -> list[str]:
        """Class names in label order."""
        return sorted(self.reader.class_to_idx, key=self.reader.class_to_idx.get)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        try:
            file, label = self.reader[index]
            with file, Image.open(file) as f:
                image = f.convert(self.input_img_mode)  # forces the full decode inside the try
        except UNREADABLE as e:
            log.warning("skipping unreadable image %s: %s", self.reader.filename(index, absolute=True), e)
            return None
        return (self.transform(image) if self.transform else image), label


def build_folder(
    root: str,
    image_size: int = 224,
    train_split: str = "train",
    val_split: str = "val",
    interpolation: str = "bilinear",
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    num_classes: int | None = None,
    input_size: Sequence[int] | None = None,
    **train_options: Any,
) -> Datasets:
    """Train and val from ``root/<train_split>`` and ``root/<val_split>``; classes are the train classes.

    The image options are ``timm.data.create_transform``'s; ``train_options`` are
    :func:`~lbc.data.transforms.train_transform`'s keywords (``rand_augment``, ``reprob``,
    ``re_mode``, ``re_count``, ``scale``, ``ratio``, ``hflip``, ``color_jitter``), named and typed there.
    """
    train_tf = train_transform(image_size, interpolation, mean=mean, std=std, **train_options)
    val_tf = val_transform(image_size, interpolation, crop_pct, mean, std)  # config errors before a long scan
    root_dir = Path(root).expanduser()
    if not root_dir.is_dir():
        raise DataError(f"data.root={root}: no such folder; expected {root}/{train_split}/<class>/<image>")
    train = ImageFiles(read_split(root_dir / train_split), train_tf)
    val = ImageFiles(read_split(root_dir / val_split, train.classes), val_tf)
    found = Datasets(train=train, val=val, num_classes=len(train.classes), input_size=(3, image_size, image_size))
    return check_declared(found, num_classes, input_size, str(root_dir / train_split))

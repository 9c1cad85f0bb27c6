"""The content of a COCO-layout data set, checked before MMDetection reads it (:func:`check_coco_data`).

mmdet's ``CocoDataset`` and ``CocoMetric`` (pycocotools) trust the annotation file: an empty split, a class
without a category, an annotation of an unknown image or category, a malformed box, a missing or unreadable
image file each end, minutes later, in a long traceback from inside the data loader or the evaluator (or,
for some, are silently skipped). Here each is one :class:`~lbc.errors.DataError` line naming the file and
the image or annotation id at fault, raised before anything is built.

What is checked, per split (``train``, ``val``), on the file as mmdet reads it:

- ``images``: at least one; each a JSON object with ``id``, ``file_name``, ``width``, ``height``; ids unique;
- ``categories``: each with ``id`` and ``name``, ids unique; every name of ``data.classes`` is one of them
  (mmdet matches classes to categories by name; other categories are ignored, as mmdet does);
- ``annotations``: each with ``id`` (unique: mmdet asserts it), ``image_id`` (an image of the file),
  ``category_id`` (a category of the file), ``bbox`` (4 finite numbers, width and height >= 0), ``area`` (a
  finite number), in ``val`` also ``iscrowd`` (COCOeval reads it), and with Mask R-CNN a ``segmentation``;
- ``train`` has at least one annotation of a class in ``data.classes`` (mmdet drops images without one);
- every image file ``<split>2017/<file_name>`` exists and PIL can identify and ``verify()`` it (the header
  is read, not every pixel: a JPEG truncated after its header passes here and fails when mmcv decodes it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lbc.detection.shapes import SPLITS, check_root_dir, check_split_paths, load_coco_split
from lbc.errors import DataError

__all__ = ["check_coco_data", "check_coco_split"]

IMAGE_KEYS = ("id", "file_name", "width", "height")
CATEGORY_KEYS = ("id", "name")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area")


def check_coco_data(root: str | os.PathLike[str], classes: Sequence[str], masks: bool = False,
                    splits: Sequence[str] = SPLITS) -> None:
    """Check every split of the COCO root ``root`` (layout: ConfigError; content: DataError, one line each).

    ``classes``: the class names the run trains (``data.classes``, or COCO's 80); ``masks``: the model
    predicts masks (Mask R-CNN), so every annotation needs a ``segmentation``.
    """
    check_root_dir(root)
    for split in splits:  # a missing file or folder first, whichever split it is in (nothing is read)
        check_split_paths(root, split)
    for split in splits:
        check_coco_split(Path(root), split, load_coco_split(root, split), classes, masks)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lacking(entry: Any, keys: Iterable[str]) -> list[str]:
    return list(keys) if not isinstance(entry, Mapping) else [k for k in keys if k not in entry]


def _duplicate(ids: Sequence[Any]) -> Any:
    """The first id that occurs twice in ``ids`` (None when all are distinct)."""
    seen: set[Any] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def _bad_box(bbox: Any) -> str | None:
    """Why ``bbox`` is not a COCO box ``[x, y, w, h]`` (None when it is one)."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return "is not a list of 4 numbers [x, y, width, height]"
    if not all(_number(v) for v in bbox):
        return "holds a value that is not a finite number"
    if bbox[2] < 0 or bbox[3] < 0:
        return "has a negative width or height"
    return None


def check_coco_split(root: Path, split: str, data: Mapping[str, Any], classes: Sequence[str],
                     masks: bool = False) -> None:
    """Check the parsed annotation file ``data`` of ``split`` and its image files (module docstring); raise
    DataError, one line naming the file and the image / category / annotation at fault."""
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    images, categories, annotations = data["images"], data["categories"], data["annotations"]
    if not images:
        raise DataError(f"{ann_file}: no images (its images list is empty); a COCO {split} split needs at least one")

    for i, image in enumerate(images):
        if lacking := _lacking(image, IMAGE_KEYS):
            what = f"image id {image['id']}" if isinstance(image, Mapping) and "id" in image else f"image #{i}"
            raise DataError(f"{ann_file}: {what} lacks {', '.join(lacking)} (an image needs {', '.join(IMAGE_KEYS)})")
    if (dup := _duplicate([image["id"] for image in images])) is not None:
        raise DataError(f"{ann_file}: image id {dup} is listed twice; image ids must be unique")

    for i, category in enumerate(categories):
        if lacking := _lacking(category, CATEGORY_KEYS):
            raise DataError(f"{ann_file}: category #{i} lacks {', '.join(lacking)} (a category needs id and name)")
    if (dup := _duplicate([c["id"] for c in categories])) is not None:
        raise DataError(f"{ann_file}: category id {dup} is listed twice; category ids must be unique")
    names = [c["name"] for c in categories]
    if unmatched := [name for name in classes if name not in names]:
        shown = ", ".join(map(str, names[:12])) + (", ..." if len(names) > 12 else "") if names else "none"
        raise DataError(f"{ann_file}: data.classes {', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''} "
                        f"{'has' if len(unmatched) == 1 else 'have'} no category of that name (its categories: "
                        f"{shown}); set data.classes to the file's category names")

    image_ids = {image["id"] for image in images}
    category_ids = {c["id"] for c in categories}
    trained = {c["id"] for c in categories if c["name"] in set(classes)}
    required = ANNOTATION_KEYS + (("iscrowd",) if split == "val" else ()) + (("segmentation",) if masks else ())
    usable = 0
    for i, ann in enumerate(annotations):
        if lacking := _lacking(ann, required):
            what = f"annotation id {ann['id']}" if isinstance(ann, Mapping) and "id" in ann else f"annotation #{i}"
            raise DataError(f"{ann_file}: {what} lacks {', '.join(lacking)} (needed: {', '.join(required)})")
        aid = ann["id"]
        if ann["image_id"] not in image_ids:
            raise DataError(f"{ann_file}: annotation id {aid} is of image id {ann['image_id']!r}, which is not "
                            "in its images list")
        if ann["category_id"] not in category_ids:
            raise DataError(f"{ann_file}: annotation id {aid} has category_id {ann['category_id']!r}, which is not "
                            f"in its categories (ids {', '.join(map(str, sorted(category_ids, key=str)[:12]))})")
        if (why := _bad_box(ann["bbox"])) is not None:
            raise DataError(f"{ann_file}: annotation id {aid} (image id {ann['image_id']}): bbox {ann['bbox']!r} {why}")
        if not _number(ann["area"]):
            raise DataError(f"{ann_file}: annotation id {aid} (image id {ann['image_id']}): area {ann['area']!r} "
                            "is not a finite number")
        usable += ann["category_id"] in trained
    if (dup := _duplicate([ann["id"] for ann in annotations])) is not None:
        raise DataError(f"{ann_file}: annotation id {dup} is listed twice; annotation ids must be unique")
    if split == "train" and usable == 0:
        raise DataError(f"{ann_file}: no annotation of the classes in data.classes: nothing to train on")
    _check_image_files(root / f"{split}2017", ann_file, images)


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot read ``path`` as an image (None when it identifies and verifies it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:  # PIL's verify raises all of these
        return " ".join(str(err).split()) or type(err).__name__
    return None


def _check_image_files(folder: Path, ann_file: Path, images: Sequence[Mapping[str, Any]]) -> None:
    """Every image of ``images`` is a file under ``folder`` that PIL can identify (threads: the work is I/O)."""
    paths = [folder / str(image["file_name"]) for image in images]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        present = list(pool.map(Path.is_file, paths))
        missing = [i for i, ok in enumerate(present) if not ok]
        if missing:
            first = images[missing[0]]
            count = "all" if len(missing) == len(images) else f"{len(missing)} of"
            raise DataError(f"{folder}: {count} {len(images)} image files named in {ann_file.name} are missing, "
                            f"first {first['file_name']} (image id {first['id']})")
        for image, why in zip(images, pool.map(_unreadable, paths), strict=True):
            if why is not None:
                raise DataError(f"{folder / str(image['file_name'])}: image id {image['id']} cannot be read as an "
                                f"image ({why}); replace the file or remove the image from {ann_file.name}")

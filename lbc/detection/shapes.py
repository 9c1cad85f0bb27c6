"""A small COCO-format detection / instance-segmentation data set that the project draws itself.

Circles, squares and triangles on textured backgrounds, with boxes and polygon masks: tests and the default
detection job need data without a download. Deterministic from a seed, written crash-safely (a temporary
sibling directory renamed into place), idempotent, and safe for concurrent callers (torchrun ranks).

A shape's pixels are exactly those whose centre lies inside its annotated polygon (COCO's reading of a
polygon: pixel ``(i, j)`` covers ``[i, i+1] x [j, j+1]``), so ``segmentation``, ``bbox`` and ``area`` describe
what is drawn. Only numpy, PIL and tqdm here: no mmdet / mmcv / mmengine.

    python -m lbc.detection.shapes --out data/shapes_coco
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lbc.errors import ConfigError

CLASSES = ("circle", "square", "triangle")  # COCO category ids 1, 2, 3
SPLITS = ("train", "val")
MANIFEST = "shapes.json"  # written last into the temporary directory: present means complete
GENERATOR = "lbc.detection.shapes"
FORMAT_VERSION = 1  # bump when the drawing changes: an old set then reads as "different parameters"

CIRCLE_SIDES = 32
SIZE_RANGE = (0.15, 0.45)  # circle diameter / square side / triangle side, as a fraction of the image side
# circumradius per unit of that size: circle 1/2, square 1/sqrt(2), equilateral triangle 1/sqrt(3)
CIRCUMRADIUS = (0.5, 1 / math.sqrt(2), 1 / math.sqrt(3))
GAP = 2.0  # pixels between the circumcircles of two shapes: their masks never touch
MIN_CONTRAST = 80.0  # RGB distance from a shape's colour to every background pixel it covers
PLACEMENT_TRIES = 50


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n", encoding="utf-8")


def _params(train_images: int, val_images: int, image_size: int, max_objects: int, seed: int) -> dict[str, int]:
    """The generator's parameters, checked: what the manifest stores and compares."""
    limits = {"train_images": 1, "val_images": 1, "image_size": 32, "max_objects": 1, "seed": 0}
    values = {"train_images": train_images, "val_images": val_images, "image_size": image_size,
              "max_objects": max_objects, "seed": seed}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < limits[key]:
            raise ConfigError(f"shapes data set: {key} must be an integer >= {limits[key]}, got {value!r}")
    return {**{key: int(value) for key, value in values.items()}, "format_version": FORMAT_VERSION}


# ----------------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float texture: a random colour gradient, stripes and noise, varied per image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    start = rng.uniform(20, 235, 3)
    end = np.clip(start + rng.uniform(-100, 100, 3), 0, 255)
    theta = rng.uniform(0, 2 * np.pi)
    along = ((xx / size - 0.5) * np.cos(theta) + (yy / size - 0.5) * np.sin(theta)) / math.sqrt(2) + 0.5
    image = start + (end - start) * along[..., None]
    amplitude, period = rng.uniform(0, 25), rng.uniform(0.04, 0.2) * size
    phi, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period + phase)
    image += amplitude * stripes[..., None] * rng.uniform(0.5, 1.0, 3)
    image += rng.normal(0.0, rng.uniform(2, 10), (size, size, 3))
    return image


def _vertices(category: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """(n, 2) polygon vertices (x, y), rounded to 0.01 px: the exact numbers the annotation stores."""
    sides = (CIRCLE_SIDES, 4, 3)[category]
    angles = angle + 2 * np.pi * np.arange(sides) / sides
    return np.round(np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1), 2)


def _polygon_mask(vertices: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: pixels whose centre lies inside the polygon (even-odd rule), vectorised over edges."""
    x, y = vertices[:, 0], vertices[:, 1]
    x0, x1 = max(math.floor(x.min()), 0), min(math.ceil(x.max()), size)
    y0, y1 = max(math.floor(y.min()), 0), min(math.ceil(y.max()), size)
    px = (np.arange(x0, x1) + 0.5)[None, None, :]
    py = (np.arange(y0, y1) + 0.5)[None, :, None]
    xa, ya = x[:, None, None], y[:, None, None]
    xb, yb = np.roll(x, -1)[:, None, None], np.roll(y, -1)[:, None, None]
    crosses = (ya > py) != (yb > py)  # the edge spans this pixel row (never for horizontal edges)
    dy = np.where(yb == ya, 1.0, yb - ya)
    crossing_x = xa + (py - ya) * (xb - xa) / dy
    inside = np.logical_xor.reduce(crosses & (px < crossing_x), axis=0)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = inside
    return mask


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least MIN_CONTRAST from every background pixel in ``under`` ((n, 3) uint8)."""
    under = under.astype(np.float64)
    for _ in range(32):
        colour = rng.integers(0, 256, 3)
        if np.sqrt(((under - colour) ** 2).sum(axis=1)).min() >= MIN_CONTRAST:
            return colour.astype(np.uint8)
    return np.where(under.mean(axis=0) < 127.5, 255, 0).astype(np.uint8)  # the farthest corner of the cube


def _render(rng: np.random.Generator, size: int, max_objects: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (uint8 RGB) and its shapes as (category index, vertices); 1..max_objects, never overlapping."""
    image = np.clip(np.rint(_background(rng, size)), 0, 255).astype(np.uint8)
    placed: list[tuple[float, float, float]] = []
    shapes: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(PLACEMENT_TRIES):  # the first shape always fits: the image is empty
            category = int(rng.integers(len(CLASSES)))
            radius = rng.uniform(*SIZE_RANGE) * size * CIRCUMRADIUS[category]
            cx, cy = rng.uniform(radius + 1, size - 1 - radius, 2)
            if all(math.hypot(cx - x, cy - y) >= radius + r + GAP for x, y, r in placed):
                break
        else:
            continue  # no room left for this one: the image keeps fewer shapes
        angle = 0.0 if category == 0 else rng.uniform(0, 2 * np.pi)
        vertices = _vertices(category, cx, cy, radius, angle)
        mask = _polygon_mask(vertices, size)
        image[mask] = _contrasting_colour(rng, image[mask])
        placed.append((cx, cy, radius))
        shapes.append((category, vertices))
    return image, shapes


def _annotation(ann_id: int, image_id: int, category: int, vertices: np.ndarray) -> dict[str, Any]:
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category + 1,
        "segmentation": [vertices.reshape(-1).tolist()],
        "bbox": [float(low[0]), float(low[1]), round(float(high[0] - low[0]), 2), round(float(high[1] - low[1]), 2)],
        "area": round(_polygon_area(vertices), 2),
        "iscrowd": 0,
    }


def _write_split(out: Path, split: str, params: dict[str, int], bar: tqdm) -> dict[str, int]:
    """Draw and save one split's images and its annotation file; per-split, per-image random streams."""
    size, count = params["image_size"], params[f"{split}_images"]
    folder = out / f"{split}2017"
    folder.mkdir()
    images, annotations = [], []
    for image_id in range(1, count + 1):
        rng = np.random.default_rng([params["seed"], SPLITS.index(split), image_id])
        pixels, shapes = _render(rng, size, params["max_objects"])
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels, mode="RGB").save(folder / file_name, format="PNG")
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for category, vertices in shapes:
            annotations.append(_annotation(len(annotations) + 1, image_id, category, vertices))
        bar.update()
    _write_json(out / "annotations" / f"instances_{split}2017.json", {
        "info": {"description": f"lbc synthetic shapes ({', '.join(CLASSES)}), {split} split",
                 "generator": GENERATOR, "params": params, "split": split, "version": str(FORMAT_VERSION)},
        "licenses": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
        "images": images,
        "annotations": annotations,
    })
    return {"images": len(images), "annotations": len(annotations)}


# ------------------------------------------------------------------------------------- the set on disk


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed); waits for the holder; released on close."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _holds_same(root: Path, params: dict[str, int]) -> bool:
    """True when ``root`` holds a complete set made with ``params``; False when it is absent or an empty
    directory; ConfigError when it holds anything else (never touched)."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory: expected the shapes data set's folder there")
    manifest = root / MANIFEST
    if not manifest.is_file():
        if any(root.iterdir()):
            raise ConfigError(f"{root} already exists and is not a shapes data set (no {MANIFEST}); "
                              "refusing to overwrite it: choose another path or empty it")
        return False
    try:
        stored = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{manifest} is not a readable shapes manifest ({err}); refusing to touch {root}") from None
    ours = isinstance(stored, dict) and stored.get("generator") == GENERATOR and isinstance(stored.get("params"), dict)
    if not ours:
        raise ConfigError(f"{root} holds a {MANIFEST} that this generator did not write; refusing to overwrite it")
    if stored["params"] != params:
        there = stored["params"]
        diff = ", ".join(f"{key} {there.get(key)!r} there, {value!r} asked"
                         for key, value in params.items() if there.get(key) != value)
        raise ConfigError(f"{root} holds a shapes data set made with other parameters ({diff}); "
                          "use another path or remove it")
    check_coco_root(root)
    return True


def make_shapes_coco(
    root: str | os.PathLike[str],
    train_images: int = 240,
    val_images: int = 60,
    image_size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
) -> Path:
    """Write the shapes set in COCO layout under ``root`` (``annotations/instances_{train,val}2017.json``,
    ``train2017/``, ``val2017/``) and return ``root`` (resolved).

    Same arguments, same bytes. Returns at once when ``root`` already holds the set made with these
    parameters; raises ConfigError when it holds anything else (a user's directory is never deleted).
    Generated into a temporary sibling directory renamed into place, under an ``flock`` on ``<root>.lock``,
    so a crash leaves nothing half-written and concurrent callers (torchrun ranks) generate it once.
    """
    params = _params(train_images, val_images, image_size, max_objects, seed)
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is not a directory: expected the shapes data set's folder there")
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if _holds_same(root, params):
            return root
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            (tmp / "annotations").mkdir()
            total = params["train_images"] + params["val_images"]
            with tqdm(total=total, desc=f"shapes -> {root.name}", unit="img", disable=None) as bar:
                counts = {split: _write_split(tmp, split, params, bar) for split in SPLITS}
            _write_json(tmp / MANIFEST, {"generator": GENERATOR, "params": params, "counts": counts,
                                         "classes": list(CLASSES)})
            os.replace(tmp, root)  # atomic; also replaces an empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


def check_coco_root(root: str | os.PathLike[str], splits: Sequence[str] = SPLITS) -> None:
    """Raise ConfigError (one line naming the path) unless ``root`` has, per split, a readable
    ``annotations/instances_<split>2017.json`` with images/annotations/categories and a ``<split>2017/`` folder.

    Checked before MMDetection starts, whose own errors for a bad root are long and late.
    """
    check_root_dir(root)
    for split in splits:
        load_coco_split(root, split)


def check_root_dir(root: str | os.PathLike[str]) -> None:
    """Raise ConfigError (one line) unless ``root`` is a directory."""
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ConfigError(f"COCO root {root} {what}: expected a directory with annotations/instances_<split>2017.json "
                          "and <split>2017/ image folders")


def load_coco_split(root: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """The parsed ``annotations/instances_<split>2017.json`` of ``root``, after checking that it is a JSON
    object with the lists images/annotations/categories and that the ``<split>2017/`` folder exists
    (ConfigError, one line naming the path). Its content is checked by :func:`lbc.detection.data.check_coco_split`."""
    root = Path(root)
    annotation = root / "annotations" / f"instances_{split}2017.json"
    check_split_paths(root, split, folder=False)
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{annotation} cannot be read as text: {' '.join(str(err).split())}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{annotation} is not valid JSON ({err.msg} at line {err.lineno} "
                          f"column {err.colno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{annotation} is not a COCO annotation file: expected a JSON object at the top")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ConfigError(f"{annotation} is not a COCO annotation file: it lacks the list(s) {', '.join(missing)}")
    check_split_paths(root, split)
    return data


def check_split_paths(root: str | os.PathLike[str], split: str, folder: bool = True) -> None:
    """Raise ConfigError (one line naming the path) unless ``split``'s annotation file (and, with ``folder``,
    its image folder) exist: cheap, nothing is read."""
    root = Path(root)
    annotation = root / "annotations" / f"instances_{split}2017.json"
    if not annotation.is_file():
        raise ConfigError(f"{annotation} is missing: expected the COCO {split} annotation file there")
    images = root / f"{split}2017"
    if folder and not images.is_dir():
        raise ConfigError(f"{images} is missing: expected the folder of COCO {split} images there")


def main(argv: list[str] | None = None) -> None:
    """``python -m lbc.detection.shapes --out DIR``: write the set, print one line; exit 2 on a bad path."""
    description = (__doc__ or "Write the shapes COCO data set.").splitlines()[0]
    parser = argparse.ArgumentParser(prog="python -m lbc.detection.shapes", description=description)
    parser.add_argument("--out", required=True, help="directory to write (COCO layout); reused when identical")
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-objects", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = make_shapes_coco(args.out, args.train_images, args.val_images, args.image_size, args.max_objects,
                                args.seed)
    except ConfigError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    counts = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["counts"]
    train, val = counts["train"], counts["val"]
    print(f"{root}: {train['images']} train images ({train['annotations']} objects), {val['images']} val images "
          f"({val['annotations']} objects), classes {', '.join(CLASSES)}")


if __name__ == "__main__":
    main()

"""The generated shapes set: deterministic, valid COCO whose annotations describe what is drawn, safe on disk."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pycocotools.coco as pycocotools_coco  # the README test command installs the det extra
import pytest
from PIL import Image

from lbc.detection import shapes
from lbc.detection.shapes import CLASSES, check_coco_root, make_shapes_coco
from lbc.errors import ConfigError
from tests.helpers import ROOT

SMALL = {"train_images": 12, "val_images": 4, "image_size": 64, "max_objects": 3, "seed": 0}


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_coco(tmp_path_factory.mktemp("shapes") / "coco", **SMALL)


def test_layout_and_manifest(small_set):
    assert sorted(os.listdir(small_set)) == ["annotations", "shapes.json", "train2017", "val2017"]
    assert sorted(os.listdir(small_set / "train2017"))[:2] == ["000000000001.png", "000000000002.png"]
    assert len(os.listdir(small_set / "train2017")) == 12 and len(os.listdir(small_set / "val2017")) == 4
    manifest = json.loads((small_set / "shapes.json").read_text())
    assert {k: v for k, v in manifest["params"].items() if k != "format_version"} == SMALL
    assert not list(small_set.parent.glob(".coco.tmp-*")), "the temporary directory was left behind"
    check_coco_root(small_set)


def test_same_arguments_same_bytes_other_seed_other_bytes(small_set, tmp_path):
    again = files(make_shapes_coco(tmp_path / "again", **SMALL))
    first = files(small_set)
    assert list(again) == list(first) and len(first) == 12 + 4 + 3
    assert all(again[name] == first[name] for name in first), [n for n in first if again[n] != first[n]]
    other = files(make_shapes_coco(tmp_path / "other", **{**SMALL, "seed": 1}))
    assert other["train2017/000000000001.png"] != first["train2017/000000000001.png"]
    assert other["annotations/instances_val2017.json"] != first["annotations/instances_val2017.json"]
    # per-split streams: the val images are not the train images
    assert first["val2017/000000000001.png"] != first["train2017/000000000001.png"]


@pytest.mark.parametrize("split, count", [("train", 12), ("val", 4)])
def test_annotations_describe_what_is_drawn(small_set, split, count):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = pycocotools_coco.COCO(str(small_set / "annotations" / f"instances_{split}2017.json"))
    assert len(coco.getImgIds()) == count
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    anns = coco.dataset["annotations"]
    assert len({a["id"] for a in anns}) == len(anns) >= count
    assert {a["category_id"] for a in anns} <= {1, 2, 3}
    total_perimeter = total_area_error = total_outside = 0.0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(small_set / f"{split}2017" / info["file_name"]))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        image_anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(image_anns) <= 3
        masks = np.stack([coco.annToMask(a).astype(bool) for a in image_anns])
        assert masks.sum(axis=0).max() == 1, f"masks overlap in {info['file_name']}"
        for ann, mask in zip(image_anns, masks, strict=True):
            assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1
            xy = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
            assert len(xy) == {1: 32, 2: 4, 3: 3}[ann["category_id"]]
            perimeter = np.linalg.norm(xy - np.roll(xy, 1, axis=0), axis=1).sum()
            # pycocotools' rasterisation of the polygon vs its exact (shoelace) area: boundary pixels only
            # (an edge running along a row of pixel centres costs up to half its length)
            area_error = abs(mask.sum() - ann["area"])
            assert area_error <= max(0.05 * ann["area"], 0.3 * perimeter), ann
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == pytest.approx((*xy.min(0), *xy.max(0)), abs=0.011)
            ys, xs = np.nonzero(mask)
            lo, hi = np.array([xs.min(), ys.min()]), np.array([xs.max(), ys.max()]) + 1
            # never more than 1 px outside the box; inside by at most 1.5 px (a triangle's tip covers
            # less than a pixel centre)
            assert (lo >= np.array([x, y]) - 1).all() and (hi <= np.array([x + w, y + h]) + 1).all(), ann
            assert (lo <= np.array([x, y]) + 1.5).all() and (hi >= np.array([x + w, y + h]) - 1.5).all(), ann
            # the mask's pixels are one solid colour, found (almost) nowhere else: the shape drawn there
            colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
            colour = colours[counts.argmax()]
            assert counts.max() >= 0.9 * mask.sum(), ann
            same = (pixels == colour).all(axis=-1)
            assert (same & ~mask).sum() <= 0.3 * perimeter, ann
            # and it stands out from the background around it
            ring = dilate(mask, 3) & ~dilate(mask, 1) & ~masks.any(axis=0)
            distance = np.linalg.norm(pixels[ring].astype(float) - colour, axis=1)
            assert np.median(distance) >= 40, ann
            total_perimeter += perimeter
            total_area_error += area_error
            total_outside += (same & ~mask).sum()
    # on the whole split: under 0.05 px per px of outline (seeds 0..29); polygons shifted by 0.25 px give > 0.09
    assert total_outside <= 0.07 * total_perimeter
    assert total_area_error <= 0.1 * total_perimeter


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def test_second_call_reuses_and_other_parameters_are_refused(small_set):
    before = mtimes(small_set)
    inode = small_set.stat().st_ino
    assert make_shapes_coco(small_set, **SMALL) == small_set
    assert mtimes(small_set) == before and small_set.stat().st_ino == inode
    with pytest.raises(ConfigError, match="seed 0 there, 1 asked") as err:
        make_shapes_coco(small_set, **{**SMALL, "seed": 1})
    one_line_naming(err, small_set)
    assert mtimes(small_set) == before


def test_foreign_directory_is_refused_and_left_intact(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not a shapes data set") as err:
        make_shapes_coco(mine, **SMALL)
    one_line_naming(err, mine)
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "shapes.json").write_text('{"generator": "someone else"}')
    with pytest.raises(ConfigError, match="did not write") as err:
        make_shapes_coco(forged, **SMALL)
    one_line_naming(err, forged)
    assert os.listdir(forged) == ["shapes.json"]


def test_empty_directory_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    root = make_shapes_coco(tmp_path / "empty", **{**SMALL, "train_images": 2, "val_images": 1})
    assert len(os.listdir(root / "train2017")) == 2
    check_coco_root(root)


def test_bad_parameters_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="image_size must be an integer >= 32"):
        make_shapes_coco(tmp_path / "x", image_size=16)
    with pytest.raises(ConfigError, match="train_images"):
        make_shapes_coco(tmp_path / "x", train_images=0)
    assert not (tmp_path / "x").exists()


def test_crash_leaves_nothing_and_the_next_call_succeeds(tmp_path, monkeypatch):
    write_split = shapes._write_split

    def crash_on_val(out, split, params, bar):
        if split == "val":
            raise RuntimeError("killed")
        return write_split(out, split, params, bar)

    monkeypatch.setattr(shapes, "_write_split", crash_on_val)
    with pytest.raises(RuntimeError, match="killed"):
        make_shapes_coco(tmp_path / "coco", **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["coco.lock"], "a half-written set or temporary directory is left"
    monkeypatch.setattr(shapes, "_write_split", write_split)
    (tmp_path / ".coco.tmp-99999").mkdir()  # left by a killed process: cleaned up under the lock
    check_coco_root(make_shapes_coco(tmp_path / "coco", **SMALL))
    assert sorted(os.listdir(tmp_path)) == ["coco", "coco.lock"]


def test_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = []
    write_split = shapes._write_split
    monkeypatch.setattr(shapes, "_write_split", lambda *a: calls.append(a[1]) or write_split(*a))
    results, errors = [], []

    def call() -> None:
        try:
            results.append(make_shapes_coco(tmp_path / "coco", **SMALL))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and results == [tmp_path / "coco"] * 3
    assert calls == ["train", "val"], "the set was generated more than once"


def copy_of(small_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_set, tmp_path / "copy"))


def test_check_coco_root_missing_root(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as err:
        check_coco_root(tmp_path / "nowhere")
    one_line_naming(err, tmp_path / "nowhere")


def test_check_coco_root_missing_annotation_file(small_set, tmp_path):
    root = copy_of(small_set, tmp_path)
    (root / "annotations" / "instances_val2017.json").unlink()
    check_coco_root(root, splits=("train",))
    with pytest.raises(ConfigError, match="is missing") as err:
        check_coco_root(root)
    one_line_naming(err, root / "annotations" / "instances_val2017.json")


def test_check_coco_root_missing_image_folder(small_set, tmp_path):
    root = copy_of(small_set, tmp_path)
    shutil.rmtree(root / "train2017")
    with pytest.raises(ConfigError, match="folder of COCO train images") as err:
        check_coco_root(root)
    one_line_naming(err, root / "train2017")


def test_check_coco_root_corrupt_or_incomplete_json(small_set, tmp_path):
    root = copy_of(small_set, tmp_path)
    annotation = root / "annotations" / "instances_train2017.json"
    annotation.write_text('{"images": [')
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        check_coco_root(root)
    one_line_naming(err, annotation)
    annotation.write_text('{"images": [], "categories": []}')
    with pytest.raises(ConfigError, match="lacks the list.s. annotations") as err:
        check_coco_root(root)
    one_line_naming(err, annotation)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lbc.detection.shapes", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_writes_a_set_and_refuses_a_file(tmp_path):
    out, taken = tmp_path / "cli", tmp_path / "a_file"
    taken.write_text("mine")
    # both at once: each start imports torch (through lbc), seconds
    good = start_cli("--out", str(out), "--train-images", "3", "--val-images", "2", "--image-size", "32", "--seed", "5")
    bad = start_cli("--out", str(taken))
    (stdout, stderr), (bad_stdout, bad_stderr) = good.communicate(timeout=120), bad.communicate(timeout=120)
    assert good.returncode == 0, stderr
    assert stderr == ""  # no progress bar when stderr is not a terminal
    assert stdout.count("\n") == 1 and str(out) in stdout and "3 train images" in stdout
    assert len(os.listdir(out / "val2017")) == 2
    check_coco_root(out)
    assert bad.returncode == 2 and bad_stdout == ""
    assert bad_stderr.startswith("error: ") and bad_stderr.count("\n") == 1 and str(taken) in bad_stderr
    assert taken.read_text() == "mine"

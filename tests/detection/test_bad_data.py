"""Bad COCO data (issue 20): each is one DataError line naming the file and the image / annotation at fault,
raised before anything is built (:func:`lbc.detection.data.check_coco_data`); a few rows end to end through
``lbc-train task=detection`` (exit 2, one ``error:`` line, no run dir), and the other one-line refusals of a
detection start: an unknown top-level ``model.cfg_options`` key, a classification run dir to resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mmdet.datasets import CocoDataset

from lbc.detection.data import check_coco_data
from lbc.detection.shapes import CLASSES, make_shapes_coco
from lbc.errors import DataError
from tests.helpers import TINY, run_cli

SMALL = {"train_images": 4, "val_images": 2, "image_size": 64, "max_objects": 2, "seed": 0}
COCO_80 = tuple(CocoDataset.METAINFO["classes"])


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_coco(tmp_path_factory.mktemp("shapes") / "coco", **SMALL)


def ann_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def edit(split: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """A mutation of ``split``'s annotation file (``change`` edits the parsed JSON in place)."""
    def apply(root: Path) -> None:
        path = ann_path(root, split)
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))  # NaN is written as NaN, which json (and mmdet) reads back
    return apply


def image_file(split: str, index: int, root: Path) -> Path:
    data = json.loads(ann_path(root, split).read_text())
    return root / f"{split}2017" / data["images"][index]["file_name"]


def first_ann(data: dict[str, Any]) -> dict[str, Any]:
    return data["annotations"][0]


def set_first(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: first_ann(d).__setitem__(key, value)


def drop_first(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: first_ann(d).pop(key)


def rm_image(index: int) -> Callable[[Path], None]:
    return lambda root: image_file("train", index, root).unlink()


def rm_all_images(root: Path) -> None:
    for p in (root / "val2017").iterdir():
        p.unlink()


def overwrite_image(content: bytes) -> Callable[[Path], None]:
    return lambda root: image_file("val", 1, root).write_bytes(content)


def truncate_image(root: Path) -> None:
    path = image_file("train", 2, root)
    path.write_bytes(path.read_bytes()[:-40])


# (id, mutation, classes, masks, what the one line must name: strings, after the fixture root is substituted)
ROWS: list[tuple[str, Callable[[Path], None], tuple[str, ...], bool, tuple[str, ...]]] = [
    ("no train images", edit("train", lambda d: d.update(images=[], annotations=[])), CLASSES, False,
     ("instances_train2017.json", "no images")),
    ("no val images", edit("val", lambda d: d.update(images=[], annotations=[])), CLASSES, False,
     ("instances_val2017.json", "no images")),
    ("a class without its category", edit("train", lambda d: d["categories"][1].update(name="box")), CLASSES,
     False, ("instances_train2017.json", "data.classes square", "circle, box, triangle")),
    ("data.classes null (COCO's 80) on another set", lambda root: None, COCO_80, False,
     ("instances_train2017.json", "data.classes person, bicycle")),
    ("unknown category id", edit("train", set_first("category_id", 99)), CLASSES, False,
     ("instances_train2017.json", "annotation id 1 ", "category_id 99")),
    ("annotation of a missing image", edit("val", set_first("image_id", 12345)), CLASSES, False,
     ("instances_val2017.json", "annotation id ", "image id 12345")),
    ("negative bbox width", edit("train", lambda d: first_ann(d)["bbox"].__setitem__(2, -3.0)), CLASSES, False,
     ("instances_train2017.json", "annotation id 1 ", "negative width or height")),
    ("negative bbox height", edit("val", lambda d: first_ann(d)["bbox"].__setitem__(3, -0.5)), CLASSES, False,
     ("instances_val2017.json", "negative width or height")),
    ("NaN in a bbox", edit("train", lambda d: first_ann(d)["bbox"].__setitem__(0, float("nan"))), CLASSES, False,
     ("instances_train2017.json", "annotation id 1 ", "[nan, ", "not a finite number")),
    ("bbox of 3 numbers", edit("train", set_first("bbox", [1, 2, 3])), CLASSES, False,
     ("annotation id 1 ", "[1, 2, 3]", "not a list of 4 numbers")),
    ("bbox as a string", edit("train", set_first("bbox", "1,2,3,4")), CLASSES, False,
     ("annotation id 1 ", "not a list of 4 numbers")),
    ("bbox with a null", edit("train", set_first("bbox", [1, 2, None, 4])), CLASSES, False,
     ("annotation id 1 ", "not a finite number")),
    ("one image file missing", rm_image(1), CLASSES, False, ("train2017", "1 of 4 image files", "000000000002.png",
                                                              "image id 2")),
    ("all image files missing", rm_all_images, CLASSES, False, ("val2017", "all 2 image files")),
    ("corrupt image file", overwrite_image(b"not an image at all" * 20), CLASSES, False,
     ("val2017/000000000002.png", "image id 2", "cannot be read as an image")),
    ("empty image file", overwrite_image(b""), CLASSES, False, ("val2017/", "cannot be read as an image")),
    ("truncated PNG", truncate_image, CLASSES, False, ("train2017/000000000003.png", "image id 3",
                                                       "cannot be read as an image")),
    # neighbours: what mmdet / pycocotools would trip on later
    ("duplicate annotation id", edit("train", lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"])),
     CLASSES, False, ("instances_train2017.json", "annotation id 1 is listed twice")),
    ("duplicate image id", edit("train", lambda d: d["images"][1].update(id=d["images"][0]["id"])), CLASSES,
     False, ("instances_train2017.json", "image id 1 is listed twice")),
    ("image without file_name", edit("val", lambda d: d["images"][0].pop("file_name")), CLASSES, False,
     ("instances_val2017.json", "image id 1 lacks file_name")),
    ("image without width, height", edit("train", lambda d: [d["images"][2].pop(k) for k in ("width", "height")]),
     CLASSES, False, ("image id 3 lacks width, height",)),
    ("image entry not an object", edit("train", lambda d: d["images"].append(7)), CLASSES, False,
     ("image #4 lacks id",)),
    ("annotation without bbox", edit("train", drop_first("bbox")), CLASSES, False, ("annotation id 1 lacks bbox",)),
    ("annotation without area", edit("train", drop_first("area")), CLASSES, False, ("annotation id 1 lacks area",)),
    ("NaN area", edit("train", set_first("area", float("nan"))), CLASSES, False, ("annotation id 1 ", "area nan")),
    ("val annotation without iscrowd", edit("val", drop_first("iscrowd")), CLASSES, False,
     ("instances_val2017.json", "lacks iscrowd")),
    ("mask model, no segmentation", edit("train", drop_first("segmentation")), CLASSES, True,
     ("annotation id 1 lacks segmentation",)),
    ("train without an annotation of the classes", edit("train", lambda d: d.update(annotations=[])), CLASSES,
     False, ("instances_train2017.json", "nothing to train on")),
    ("category without name", edit("val", lambda d: d["categories"][0].pop("name")), CLASSES, False,
     ("instances_val2017.json", "category #0 lacks name")),
    ("duplicate category id", edit("train", lambda d: d["categories"][2].update(id=1)), CLASSES, False,
     ("category id 1 is listed twice",)),
]


def test_the_clean_set_passes_and_subset_classes_are_fine(clean_set):
    check_coco_data(clean_set, CLASSES, masks=True)
    check_coco_data(clean_set, ("triangle", "circle"))  # mmdet trains a subset of the categories by name


@pytest.mark.parametrize("mutate, classes, masks, named", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_data_is_one_line_naming_the_culprit(mutate, classes, masks, named, clean_set, tmp_path):
    root = Path(shutil.copytree(clean_set, tmp_path / "coco"))
    mutate(root)
    with pytest.raises(DataError) as err:
        check_coco_data(root, classes, masks=masks)
    message = str(err.value)
    assert "\n" not in message and str(root) in message, message
    assert all(part in message for part in named), message


# --- end to end: lbc-train task=detection, data=coco on a bad copy ---------------------------------------------
COCO = ["task=detection", "data=coco", "data.classes=[circle,square,triangle]"]
E2E = [
    ("negative bbox width", edit("train", lambda d: first_ann(d)["bbox"].__setitem__(2, -3.0)),
     "annotation id 1 (image id 1): bbox"),
    ("one image file missing", rm_image(1), "000000000002.png (image id 2)"),
    ("corrupt image file", overwrite_image(b"\x89PNG garbage"), "val2017/000000000002.png: image id 2 cannot be read"),
]


@pytest.mark.parametrize("mutate, named", [r[1:] for r in E2E], ids=[r[0] for r in E2E])
def test_bad_data_through_lbc_train(mutate, named, clean_set, tmp_path):
    root = Path(shutil.copytree(clean_set, tmp_path / "coco"))
    mutate(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    code, out, err = run_cli(*COCO, f"data.root={root}", f"run_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:], out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()  # nothing built, no run dir left
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the data is never touched


def test_an_unknown_top_level_cfg_options_key_is_refused_with_close_matches(clean_set, tmp_path):
    code, out, err = run_cli("task=detection", f"data.root={clean_set}", *(f"data.{k}={v}" for k, v in SMALL.items()),
                             "+model.cfg_options.trian_cfg.val_interval=2", f"run_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err[-2000:])
    assert lines[0].startswith("error: model.cfg_options: trian_cfg.val_interval: trian_cfg is not a top-level key")
    assert "did you mean train_cfg" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_last_checkpoint_mmengine_did_not_write_is_refused(clean_set, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"a classification checkpoint")
    (run_dir / "last_checkpoint").write_text(str(run_dir / "last.pt"))
    code, out, err = run_cli("task=detection", f"data.root={clean_set}", *(f"data.{k}={v}" for k, v in SMALL.items()),
                             f"run_dir={run_dir}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err[-2000:])
    assert lines[0] == (f"error: run_dir={run_dir}: last_checkpoint names {run_dir / 'last.pt'}, which is not a "
                        "checkpoint mmengine wrote (epoch_<n>.pth); a detection run resumes only its own: use "
                        "another run_dir"), lines[0]
    # nothing written but lbc.run's lock file (which a failed start leaves in a folder it did not create)
    assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["last.pt", "last_checkpoint"]
    assert (run_dir / "last.pt").read_bytes() == b"a classification checkpoint"


@pytest.mark.slow
def test_a_classification_run_dir_is_not_resumed_as_detection(clean_set, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*TINY, "schedule.epochs=1", f"run_dir={run_dir}")
    assert code == 0 and (run_dir / "last.pt").is_file(), err[-2000:]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    code, out, err = run_cli("task=detection", f"data.root={clean_set}", *(f"data.{k}={v}" for k, v in SMALL.items()),
                             f"run_dir={run_dir}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: run_dir={run_dir}"), (code, err[-2000:])
    assert "Traceback" not in err + out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before

"""The export directory: ``model.safetensors`` (the model's own state-dict keys), ``config.yaml`` (what
:func:`load_exported` needs to build the model again, and how to feed it: the run's evaluation
preprocessing and class names), ``report.json`` (per layer: pattern, density, N:M or not) and, on
request, ``model.onnx`` (with the same preprocessing and class names in its metadata); each written
atomically, and read back by :func:`load_exported` and :func:`read_preprocess`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import nn

from lbc.errors import ConfigError, DataError, first_line
from lbc.export.check import read_weights
from lbc.export.fold import (
    Folded,
    Say,
    fold_checkpoint,
    input_size_of,
    load_state,
    load_training_checkpoint,
    silent,
)
from lbc.export.onnx import ONNX_FILE, ONNX_OPSET, export_onnx
from lbc.io import atomic_write
from lbc.models import build_model

if TYPE_CHECKING:
    from PIL import Image

FILES = ("model.safetensors", "config.yaml", "report.json")
# model.onnx's metadata_props (onnxruntime: InferenceSession(...).get_modelmeta().custom_metadata_map), JSON values
ONNX_PREPROCESS_KEY, ONNX_CLASSES_KEY = "lbc.preprocess", "lbc.classes"


def report_json(report: Mapping[str, Any]) -> str:
    """report.json's text: the totals indented, one line per layer."""
    head = json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1)
    layers = ",\n".join(f"  {json.dumps(row)}" for row in report.get("layers", []))
    return f'{head[:-2]},\n "layers": [\n{layers}\n ]\n}}\n'


# Every name an export of lbc-export writes into its directory (classification, detection, lm: the lm
# export's tokenizer files are listed in its lbc_export.json), and what a run directory holds.
EXPORT_NAMES = frozenset({*FILES, "model.onnx", "model.onnx.data", "lbc_export.json", "model.pth", "config.py"})
RUN_MARKERS = ("last.pt", "metrics.jsonl", ".lock", ".hydra", "last_checkpoint", "train.log")
_TEMP = re.compile(r"\..+\.[0-9a-f]{8}\.tmp|\.lbc-export-.*")  # atomic_write's temp files, lm's staging folders


def _listed_files(out: Path) -> set[str]:
    """The plain file names an earlier export's ``lbc_export.json`` lists (its ``files``), if it has one."""
    try:
        files = json.loads((out / "lbc_export.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in files if isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..")} \
        if isinstance(files, list) else set()


def check_out_dir(out: str | Path) -> Path:
    """``--out`` as a directory an export may write into, checked before anything is read or written.

    A new or empty directory, or an earlier export's (nothing in it but the files an export writes). A run
    directory (``last.pt``, ``metrics.jsonl``, ``.lock``, ``.hydra``, a detection run's ``last_checkpoint``
    or ``epoch_<n>.pth``, a run's ``config.yaml``), a file, or a directory holding anything else is a
    one-line ConfigError: the export would overwrite or mix with files that are not its own.
    """
    out = Path(out)
    where = f"--out {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where} is a file; pass a directory")
    if not out.is_dir():
        return out
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror or err}") from None
    marker = next((m for m in RUN_MARKERS if m in names), None)
    marker = marker or next((n for n in names if re.fullmatch(r"epoch_\d+\.pth", n)), None)
    if marker is None and "config.yaml" in names and not _is_export_config(out / "config.yaml"):
        marker = "config.yaml, a run's config"
    if marker is not None:
        raise ConfigError(f"{where} is a run directory (it holds {marker}): an export there would overwrite the "
                          "run's files; pass a new directory")
    allowed = EXPORT_NAMES | _listed_files(out)
    foreign = [n for n in names if n not in allowed and not _TEMP.fullmatch(n)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"{where} holds files an export does not write ({shown}); pass a new or empty directory, "
                          "or an earlier export's")
    return out


def _is_export_config(path: Path) -> bool:
    try:
        read_export_config(path)
    except ConfigError:
        return False
    return True


def _out_dir(out: str | Path) -> Path:
    """``--out`` checked (:func:`check_out_dir`) and created; one line if it cannot be."""
    out = check_out_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {str(out)!r} cannot be created: {err.strerror or err}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {str(out)!r} is not writable")
    return out


def write_export(folded: Folded, out: str | Path, *, onnx: bool = False, opset: int = ONNX_OPSET,
                 say: Say = silent) -> dict[str, Any]:
    """Write ``model.safetensors``, ``config.yaml`` and ``report.json`` (and ``model.onnx``) into ``out``.

    Each file is written atomically; a ``model.onnx`` left by an earlier export is removed when
    this one writes none (it would not match). Returns the report.
    """
    from safetensors.torch import save_file

    out = _out_dir(out)
    report = folded.report()
    metadata = {"format": "pt", "lbc_pattern": str(folded.pattern), "lbc_method": str(report.get("method")),
                "lbc_model": str(report.get("model"))}
    say(f"writing {out / 'model.safetensors'}")
    atomic_write(out / "model.safetensors", lambda p: save_file(folded.state, str(p), metadata=metadata))
    atomic_write(out / "config.yaml", lambda p: p.write_text(yaml.safe_dump(folded.config, sort_keys=False)))
    if onnx:
        if not folded.config.get("input_size"):
            raise ConfigError("--onnx needs the input size, which the run's config does not say: pass --input-size C H W")
        say(f"writing {out / ONNX_FILE} (opset {opset}) and checking it with onnxruntime")
        report["onnx"] = export_onnx(folded.model, folded.config["input_size"], out / ONNX_FILE, opset=opset,
                                     metadata=onnx_metadata(folded))
    else:
        for stale in (out / ONNX_FILE, out / f"{ONNX_FILE}.data"):
            stale.unlink(missing_ok=True)
    for stale in ("lbc_export.json", "model.pth", "config.py"):  # an earlier lm or detection export's: they would
        (out / stale).unlink(missing_ok=True)  # not match (and lbc-check would read lbc_export.json)
    atomic_write(out / "report.json", lambda p: p.write_text(report_json(report)))
    return report


def export_run(source: str | Path, out: str | Path, *, ema: bool = False, onnx: bool = False,
               opset: int = ONNX_OPSET, input_size: list[int] | None = None,
               say: Say = silent) -> tuple[Folded, dict[str, Any]]:
    """``lbc-export``'s work: read the run's checkpoint, fold it, write the export into ``out``; (folded, report).

    A language-model run (``task=lm``) goes to :mod:`lbc.export.lm` (a ``save_pretrained`` directory), a
    detection run (its run directory or an ``epoch_<n>.pth``) to :mod:`lbc.export.detection` (a plain mmdet
    checkpoint). ``out`` is checked first (:func:`check_out_dir`: never a run directory).
    """
    check_out_dir(out)  # before the checkpoint is read: a run directory is refused at once
    from lbc.export.detection import check_detection_options, detection_checkpoint, export_detection

    detection = detection_checkpoint(source)
    if detection is not None:  # a detection run: a plain mmdet checkpoint (lbc.export.detection)
        check_detection_options(ema=ema, onnx=onnx, input_size=input_size)
        return export_detection(detection, out, say=say)
    ckpt, path = load_training_checkpoint(source)
    task = ckpt["config"].get("task")
    if isinstance(task, dict) and task.get("name") == "lm":
        from lbc.export.lm import check_lm_options, fold_lm, write_lm  # lm imports this module

        check_lm_options(ema=ema, onnx=onnx, input_size=input_size)
        lm = fold_lm(ckpt, source=str(path), say=say)
        return lm, write_lm(lm, out, say=say)
    folded = fold_checkpoint(ckpt, ema=ema, source=str(path), say=say, input_size=input_size)
    folded.config.update(describe_inputs(ckpt["config"], folded.config["input_size"], folded.config["num_classes"], say))
    return folded, write_export(folded, out, onnx=onnx, opset=opset, say=say)


def onnx_metadata(folded: Folded) -> dict[str, str]:
    """model.onnx's ``metadata_props``: the preprocessing and class names (JSON) and the model's facts."""
    meta = {"lbc.model": str(folded.config["model"].get("name")), "lbc.method": str(folded.meta.get("method")),
            "lbc.pattern": str(folded.pattern)}
    for key, name in ((ONNX_PREPROCESS_KEY, "preprocess"), (ONNX_CLASSES_KEY, "classes")):
        if folded.config.get(name) is not None:
            meta[key] = json.dumps(folded.config[name])
    return meta


# --- what the model's input is: the run's evaluation preprocessing, its class names -------------


def run_preprocess(config: Mapping[str, Any], input_size: list[int] | None, say: Say = silent) -> dict[str, Any] | None:
    """The evaluation preprocessing of a classification run (its ``data`` config), for ``input_size`` [C, H, W].

    From the data code itself (:func:`lbc.data.transforms.eval_preprocess`: the val transform timm
    builds; :func:`~lbc.data.transforms.digits_preprocess`). An export at another (square) size than the
    run's gets the run's recipe at that size, and says so. None (and a line said) when it is unknown.
    """
    from lbc.data.transforms import digits_preprocess, eval_preprocess

    data = config.get("data") or {}
    name, trained = data.get("name"), input_size_of(config)
    if not input_size:
        say("config.yaml: no preprocess (the input size is unknown)")
        return None
    size = int(input_size[1])
    resized = trained is not None and list(trained) != list(input_size)
    if resized and (input_size[1] != input_size[2] or trained[0] != input_size[0]):
        say(f"config.yaml: no preprocess (the run's data is {trained}, the export's input {input_size})")
        return None
    if name == "folder":
        keys = ("interpolation", "crop_pct", "mean", "std")
        recipe = eval_preprocess(size, **{k: data[k] for k in keys if data.get(k) is not None})
    elif name == "digits":
        recipe = digits_preprocess(size)
    elif name == "synthetic":
        recipe = {"source": "synthetic data: random N(0, 1) tensors, no image preprocessing"}
    else:
        say(f"config.yaml: no preprocess (data.name={name!r} has no known evaluation transform)")
        return None
    if resized:
        say(f"config.yaml: preprocess for {input_size} (the run evaluated at {trained}: its recipe at this size)")
        recipe["note"] = f"the run evaluated at {trained}; exported for {list(input_size)} with its recipe at that size"
    return {"input_size": [int(v) for v in input_size], "layout": "NCHW", "dtype": "float32", **recipe}


def run_classes(config: Mapping[str, Any], num_classes: int, say: Say = silent) -> list[str] | None:
    """The class names in label order, when the run's data has them (digits: "0".."9"; folder: the train folders).

    A folder run's names are read as training read them (timm's folder reader on ``root/train_split``),
    so that folder must still be there; None (and a line said) when it is not.
    """
    data = config.get("data") or {}
    if data.get("name") == "digits":
        from sklearn.datasets import load_digits

        classes = [str(c) for c in load_digits().target_names]
    elif data.get("name") == "folder" and data.get("root"):
        from lbc.data.folder import ImageFiles, read_split

        split_dir = Path(str(data["root"])).expanduser() / str(data.get("train_split") or "train")
        say(f"reading the class names from {split_dir}")
        try:
            classes = ImageFiles(read_split(split_dir)).classes
        except (DataError, OSError) as err:
            say(f"no class names written: {first_line(err)}")
            return None
    else:
        return None
    if len(classes) != num_classes:
        say(f"no class names written: the data has {len(classes)} classes, the model {num_classes}")
        return None
    return classes


def describe_inputs(config: Mapping[str, Any], input_size: list[int] | None, num_classes: int,
                    say: Say = silent) -> dict[str, Any]:
    """config.yaml's ``preprocess`` and ``classes`` entries (those that are known) for a classification run."""
    found = {"preprocess": run_preprocess(config, input_size, say), "classes": run_classes(config, num_classes, say)}
    pre = found["preprocess"]
    if pre and "resize" in pre:
        say(f"preprocess: {pre['image_mode']} image, short side to {pre['resize']['shorter_side']} "
            f"({pre['resize']['interpolation']}), centre crop {pre['center_crop']}, /{pre['divide']:g}, "
            f"mean {pre['mean']}, std {pre['std']}, {pre['layout']} {pre['dtype']}")
    return {k: v for k, v in found.items() if v is not None}


def load_exported(out: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an export directory: built from its ``config.yaml``, weights from ``model.safetensors``."""
    out = Path(out)
    config = read_export_config(out / "config.yaml")
    model = build_model(num_classes=int(config["num_classes"]), **dict(config["model"]))
    load_state(model, read_weights(out / "model.safetensors"), str(out / "model.safetensors"))
    return model.to(device).eval()


def read_preprocess(out: str | Path) -> dict[str, Any] | None:
    """The evaluation preprocessing an export's ``config.yaml`` holds (None if it has none: an older export).

    Its class names, when known, are ``read_export_config(out / "config.yaml")["classes"]``.
    """
    return read_export_config(Path(out) / "config.yaml").get("preprocess")


def preprocess_image(image: Image.Image | np.ndarray, preprocess: Mapping[str, Any] | str | Path) -> torch.Tensor:
    """An image (PIL, or a uint8 H x W [x C] array) as the model's (C, H, W) float32 input, by ``preprocess``.

    ``preprocess``: an export's (:func:`read_preprocess`) or its directory. torchvision's PIL resize and
    centre crop, as the evaluation transform does them: for folder runs the very tensor evaluation gives;
    digits were upscaled from 8x8 in float, which 8-bit images match to about 1/255.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    if not isinstance(preprocess, Mapping):
        where = Path(preprocess) / "config.yaml"
        preprocess = read_preprocess(preprocess)
        if preprocess is None:
            raise ConfigError(f"{str(where)!r} has no preprocess entry: export the run again with this lbc-export")
    if "resize" not in preprocess:
        raise ConfigError(f"this export's input is not an image: {preprocess.get('source', 'no resize in preprocess')}")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"preprocess_image: pass a uint8 image array, not {image.dtype}")
        image = Image.fromarray(image)
    resize = preprocess["resize"]
    image = TF.resize(image.convert(preprocess["image_mode"]), resize["shorter_side"],
                      interpolation=TF.InterpolationMode(resize["interpolation"]))
    x = TF.pil_to_tensor(TF.center_crop(image, list(preprocess["center_crop"]))).to(torch.float32)
    x = (x / float(preprocess["divide"])).expand(int(preprocess["input_size"][0]), -1, -1)
    return TF.normalize(x, list(preprocess["mean"]), list(preprocess["std"]))


def read_export_config(path: str | Path) -> dict[str, Any]:
    """An export's config.yaml (one-line ConfigError if it is not one)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable export config: {first_line(err)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not config.get("num_classes"):
        raise ConfigError(f"{str(path)!r} is not an lbc export config (no model section or num_classes)")
    classes = config["num_classes"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ConfigError(f"{str(path)!r}: num_classes={classes!r} is not allowed; use a positive integer "
                          "(the export's own value: export the run again rather than editing it)")
    if not isinstance(config["model"].get("name"), str):
        raise ConfigError(f"{str(path)!r}: model.name={config['model'].get('name')!r} is not a model name")
    return config

"""The export says how to feed its model: config.yaml's ``preprocess`` and ``classes`` (and model.onnx's metadata)
are what lbc's evaluation transform does, so examples/onnx_inference.py (onnxruntime and numpy only) gives the
PyTorch model's answer on lbc's own eval tensors, and a wrong number in the metadata does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from lbc.data import build_datasets
from lbc.data.digits import digits_split
from lbc.data.transforms import digits_preprocess, eval_preprocess, val_transform
from lbc.errors import ConfigError
from lbc.export import ONNX_CLASSES_KEY, ONNX_PREPROCESS_KEY, load_exported, preprocess_image, read_preprocess
from lbc.export.write import run_classes, run_preprocess
from lbc.io import read_pt
from tests.export.conftest import FOLDER_CLASSES
from tests.helpers import ROOT

EXAMPLE = ROOT / "examples" / "onnx_inference.py"
COMMON = {"input_size": [3, 32, 32], "layout": "NCHW", "dtype": "float32"}


def photo(size: tuple[int, int] = (42, 37), seed: int = 0) -> Image.Image:
    """A non-square RGB image (W x H) with structure at every scale: smooth gradients plus noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    noise = np.random.default_rng(seed).normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def run_example(onnx_file: Path, image: Path) -> list[tuple[str, float]]:
    """examples/onnx_inference.py in a fresh interpreter: its printed (class, probability) lines."""
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(onnx_file), str(image)], capture_output=True, text=True,
                          timeout=120, cwd=image.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(name, float(p)) for name, p in (line.split("\t") for line in proc.stdout.splitlines())]


def torch_ranking(model: torch.nn.Module, x: torch.Tensor, classes: list[str]) -> list[tuple[str, float]]:
    """The PyTorch model's (class, probability) on one (C, H, W) input, most probable first."""
    with torch.no_grad():
        p = model(x[None]).softmax(-1)[0]
    return [(classes[i], float(p[i])) for i in p.argsort(descending=True)]


def with_metadata(onnx_file: Path, out: Path, **changes) -> Path:
    """A copy of ``onnx_file`` whose lbc.preprocess metadata has ``changes`` applied."""
    model = onnx.load(str(onnx_file))
    (entry,) = [p for p in model.metadata_props if p.key == ONNX_PREPROCESS_KEY]
    entry.value = json.dumps({**json.loads(entry.value), **changes})
    onnx.save(model, str(out))
    return out


def eval_transform_of(run_dir: Path):
    """lbc's own val transform of a folder run: its data config through build_datasets, as training builds it."""
    data = read_pt(run_dir / "last.pt", "test")["config"]["data"]
    return build_datasets(**{k: v for k, v in data.items() if k not in ("loader", "augment")}).val.transform


# --- the recipes, against the transforms they describe (no training) ----------------------------


@pytest.mark.parametrize(("size", "interpolation", "crop_pct", "mean", "std"), [
    (224, "bilinear", 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm's defaults
    (32, "bicubic", 0.8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    (24, "random", 1.0, (0.1, 0.2, 0.3), (0.3, 0.3, 0.3)),  # random: bilinear at evaluation
])
def test_eval_preprocess_gives_the_val_transforms_tensor(size, interpolation, crop_pct, mean, std):
    pre = {**COMMON, "input_size": [3, size, size], **eval_preprocess(size, interpolation, crop_pct, mean, std)}
    assert pre["resize"] == {"shorter_side": int(size / crop_pct),
                             "interpolation": "bilinear" if interpolation == "random" else interpolation}
    assert pre["center_crop"] == [size, size] and pre["mean"] == list(mean) and pre["std"] == list(std)
    json.dumps(pre)  # plain data: it goes into JSON metadata as it is
    reference = val_transform(size, interpolation, crop_pct, mean, std)
    for image in (photo(), photo((300, 257), 1), photo((40, 90), 2)):  # wider, larger, taller
        expected = reference(image)
        torch.testing.assert_close(preprocess_image(image, pre), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(preprocess_image(np.asarray(image), pre), expected, rtol=0, atol=1e-6)
        wrong = {**pre, "mean": [m + 0.05 for m in mean]}
        assert (preprocess_image(image, wrong) - expected).abs().min() > 0.1  # every value moves


def test_digits_preprocess_is_what_build_digits_gives():
    pre = {**COMMON, **digits_preprocess(32)}
    val = build_datasets("digits", image_size=32).val
    digits = load_digits()
    index = digits_split(digits.target)[1]
    raw = torch.as_tensor(digits.images[index[:40]], dtype=torch.float32)[:, None] / 16
    # the recipe's numbers on the data's own float images: exactly the data set's items
    up = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean, std = torch.tensor(pre["mean"])[:, None, None], torch.tensor(pre["std"])[:, None, None]
    items = torch.stack([val[i][0] for i in range(40)])
    torch.testing.assert_close((up - mean) / std, items, rtol=0, atol=1e-5)
    # and on 8-bit images of those digits (what a user has), through PIL: the same to about 1/255
    for k in range(40):
        image = Image.fromarray(np.round(raw[k, 0].numpy() * 255).astype(np.uint8))
        diff = (preprocess_image(image, pre) - items[k]).abs().max()
        assert diff < 1.5 / 255 / pre["std"][0], (k, diff)
    assert pre["image_mode"] == "L" and "8x8" in pre["source"]


def test_run_preprocess_follows_the_run_config_and_the_export_size():
    said: list[str] = []
    config = {"data": {"name": "folder", "root": "/nonexistent", "image_size": 32, "crop_pct": 0.8,
                       "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                       "input_size": [3, 32, 32]}}
    pre = run_preprocess(config, [3, 32, 32], said.append)
    assert pre == {**COMMON, **eval_preprocess(32, "bicubic", 0.8, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])}
    bigger = run_preprocess(config, [3, 48, 48], said.append)  # --input-size: the run's recipe at that size
    assert bigger["resize"]["shorter_side"] == 60 and bigger["center_crop"] == [48, 48] and "note" in bigger
    assert run_preprocess(config, [3, 48, 40], said.append) is None and "no preprocess" in said[-1]
    assert run_preprocess({"data": {"name": "digits", "image_size": 16, "input_size": [3, 16, 16]}},
                          [3, 16, 16])["resize"]["shorter_side"] == 16
    synthetic = run_preprocess({"data": {"name": "synthetic", "input_size": [3, 8, 8]}}, [3, 8, 8])
    assert "resize" not in synthetic and synthetic["input_size"] == [3, 8, 8]
    with pytest.raises(ConfigError, match="not an image"):
        preprocess_image(photo(), synthetic)
    assert run_classes(config, 3, said.append) is None and "no class names" in said[-1]  # the folder is gone
    assert run_classes({"data": {"name": "digits"}}, 10) == [str(d) for d in range(10)]


# --- the exports: config.yaml and model.onnx, read by the example ------------------------------


@pytest.mark.slow
def test_folder_export_feeds_the_onnx_example_what_evaluation_feeds_the_model(folder_run, folder_export, tmp_path):
    config = yaml.safe_load((folder_export / "config.yaml").read_text())
    assert config["classes"] == FOLDER_CLASSES  # the train folders, in label order
    pre = read_preprocess(folder_export)
    assert pre == config["preprocess"] and pre["mean"] == [0.5, 0.4, 0.3] and pre["resize"]["shorter_side"] == 40
    import onnxruntime as ort

    meta = ort.InferenceSession(str(folder_export / "model.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta[ONNX_PREPROCESS_KEY]) == pre and json.loads(meta[ONNX_CLASSES_KEY]) == FOLDER_CLASSES

    image_file = tmp_path / "photo.png"
    photo().save(image_file)  # 42x37: resized to 45x40, the centre crop's left edge is round(6.5) = 6
    evaluated = eval_transform_of(folder_run)(Image.open(image_file).convert("RGB"))
    torch.testing.assert_close(preprocess_image(Image.open(image_file), folder_export), evaluated, rtol=0, atol=1e-6)
    expected = torch_ranking(load_exported(folder_export), evaluated, FOLDER_CLASSES)
    got = run_example(folder_export / "model.onnx", image_file)
    assert [name for name, _ in got] == [name for name, _ in expected]  # top-1 (and the order of the rest)
    np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=2e-5)

    # the same example, metadata a little wrong: its probabilities leave the model's
    for change in ({"mean": [0.485, 0.456, 0.406]}, {"std": [0.229, 0.224, 0.225]},
                   {"resize": {"shorter_side": 32, "interpolation": "bicubic"}}):
        wrong = run_example(with_metadata(folder_export / "model.onnx", tmp_path / "wrong.onnx", **change), image_file)
        gap = max(abs(dict(wrong)[name] - p) for name, p in expected)
        assert gap > 1e-3, (change, gap)


@pytest.mark.slow
def test_digits_export_feeds_the_onnx_example_what_evaluation_feeds_the_model(lbc_export, tmp_path):
    config = yaml.safe_load((lbc_export / "config.yaml").read_text())
    assert config["classes"] == [str(d) for d in range(10)]
    assert config["preprocess"] == {**COMMON, **digits_preprocess(32)}
    model, val = load_exported(lbc_export), build_datasets("digits", image_size=32).val
    with torch.no_grad():  # the val digit the model is surest of: a top-1 that 1/255 cannot flip
        p = model(torch.stack([val[i][0] for i in range(60)])).softmax(-1).sort(descending=True).values
    k = int((p[:, 0] - p[:, 1]).argmax())
    digits = load_digits()
    raw = digits.images[digits_split(digits.target)[1][k]]
    image_file = tmp_path / "digit.png"
    Image.fromarray(np.round(raw * 255 / 16).astype(np.uint8)).save(image_file)  # 8x8 grey, 0-255
    expected = torch_ranking(model, val[k][0], config["classes"])
    got = run_example(lbc_export / "model.onnx", image_file)
    assert len(got) == 5 and got[0][0] == expected[0][0]
    np.testing.assert_allclose([p for _, p in got], [dict(expected)[name] for name, _ in got], atol=0.01)

"""lbc-export of a detection run: a plain mmdet checkpoint that mmdet's ``init_detector`` loads in a process where
lbc is never imported, whose predictions equal the masked model's; lbc-check reads its N:M pattern (issue 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="the detection extra (mmdet) is not installed")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import lbc.detection.plugin  # noqa: E402,F401  (SparseDetector, SparsityHook: the run's model)
from lbc.cli.check import main as check_main  # noqa: E402
from lbc.cli.export import main as export_main  # noqa: E402
from lbc.detection.checkpoint import mmengine_safe_globals  # noqa: E402
from lbc.detection.shapes import make_shapes_coco  # noqa: E402
from lbc.export.detection import DET_FILES  # noqa: E402
from tests.detection.mmdet_helpers import detection_config  # noqa: E402

pytestmark = pytest.mark.slow

# SR-STE 2:4 on the backbone (stem dense): its checkpoint keeps the dense weights and a 2:4 mask, so the export
# must fold the mask in (LBC zeroes its removed weights itself: folding would change nothing to test)
SPARSITY = {"method": "srste", "pattern": "2:4"}
CHECKPOINT = "epoch_1.pth"

# Run by a fresh interpreter: any import of lbc fails, so the export must load with mmdet alone.
NO_LBC = textwrap.dedent("""
    import importlib.abc, json, sys
    class NoLbc(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lbc" or name.startswith("lbc."):
                raise ImportError(f"lbc must not be imported here ({name})")
            return None
    sys.meta_path.insert(0, NoLbc())
    import torch
    from mmdet.apis import inference_detector, init_detector
    config, checkpoint, image, out = sys.argv[1:5]
    model = init_detector(config, checkpoint, device="cpu")
    pred = inference_detector(model, image).pred_instances
    torch.save({"bboxes": pred.bboxes, "scores": pred.scores, "labels": pred.labels,
                "classes": list(model.dataset_meta["classes"]), "type": type(model).__name__,
                "lbc_modules": sorted(m for m in sys.modules if m == "lbc" or m.startswith("lbc."))}, out)
""")


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch SR-STE Faster R-CNN (ResNet-18) run on 8 generated 64-px images: its work dir."""
    base = tmp_path_factory.mktemp("det_export")
    root = make_shapes_coco(base / "shapes", train_images=8, val_images=4, image_size=64, max_objects=3, seed=0)
    cfg = detection_config("faster", root, base / "run", sparsity=SPARSITY, epochs=1, batch_size=4, image_size=64,
                           checkpoint_interval=1, warmup_iters=2)
    with mmengine_safe_globals():
        Runner.from_cfg(cfg).train()
    assert (base / "run" / CHECKPOINT).is_file() and (base / "run" / "last_checkpoint").is_file()
    return base / "run"


@pytest.fixture(scope="module")
def det_export(det_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("det_out") / "export"
    assert export_main([str(det_run), "--out", str(out), "--quiet"]) == 0
    return out


def masked_model(run_dir: Path) -> torch.nn.Module:
    """The run's own SparseDetector (masks attached, eval mode) from its checkpoint, as mmdet loads it."""
    from mmdet.apis import init_detector

    ckpt = run_dir / CHECKPOINT
    with mmengine_safe_globals():
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)["meta"]
        # cfg_options={}: init_detector would otherwise look for model.backbone (SparseDetector has model.detector)
        model = init_detector(Config.fromstring(meta["cfg"], ".py"), str(ckpt), device="cpu", cfg_options={})
    assert type(model).__name__ == "SparseDetector"
    return model


def test_the_export_is_a_plain_mmdet_checkpoint_with_the_masked_models_predictions(det_run, det_export, tmp_path):
    assert sorted(p.name for p in det_export.iterdir()) == sorted(DET_FILES)
    ckpt = torch.load(det_export / "model.pth", map_location="cpu", weights_only=True)  # no pickled code in it
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith("detector.") or ".parametrizations." in k for k in keys)
    assert "backbone.layer1.0.conv1.weight" in keys and "roi_head.bbox_head.fc_cls.weight" in keys
    with mmengine_safe_globals():
        run_state = torch.load(det_run / CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
    plain_keys = {k.removeprefix("detector.") for k in run_state if ".parametrizations." not in k}
    assert set(keys) == plain_keys  # exactly the plain detector's keys
    masks = {k.removeprefix("detector.").replace(".parametrizations.weight.0.mask", ".weight"): m
             for k, m in run_state.items() if k.endswith(".parametrizations.weight.0.mask")}
    assert len(masks) > 10 and all(k.startswith("backbone.layer") for k in masks)
    masked = masked_model(det_run)
    for key in masks:  # the masks folded in: the weight the masked model computes with (B * W), not the stored one
        effective = masked.detector.get_submodule(key.removesuffix(".weight")).weight.detach()
        assert torch.equal(ckpt["state_dict"][key], effective), key
        assert not torch.equal(run_state[f"detector.{key}"], effective), key  # the run stores dense weights
    assert ckpt["meta"]["dataset_meta"]["classes"] == ["circle", "square", "triangle"]
    config = (det_export / "config.py").read_text()
    assert "SparseDetector" not in config and "lbc" not in config and "type='FasterRCNN'" in config
    assert "Resumable" not in config and "type='EpochBasedTrainLoop'" in config  # mmengine's loop, mmdet's sampler

    image = str(sorted((det_run.parent / "shapes" / "val2017").iterdir())[0])
    out = tmp_path / "plain.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": "",
                                                                         "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NO_LBC, str(det_export / "config.py"), str(det_export / "model.pth"),
                           image, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(out, weights_only=True)
    assert plain["type"] == "FasterRCNN" and plain["lbc_modules"] == []
    assert plain["classes"] == ["circle", "square", "triangle"]
    from mmdet.apis import inference_detector

    pred = inference_detector(masked, image).pred_instances
    masked = {"bboxes": pred.bboxes, "scores": pred.scores, "labels": pred.labels}
    assert masked["scores"].numel() > 0  # something to compare
    for key in ("bboxes", "scores", "labels"):
        assert plain[key].shape == masked[key].shape, key
        assert torch.allclose(plain[key].float(), masked[key].float(), rtol=1e-5, atol=1e-5), key

    report = json.loads((det_export / "report.json").read_text())
    assert report["task"] == "detection" and report["pattern"] == "2:4" and report["exact_nm"] is True
    sparse = [row["name"] for row in report["layers"] if row["pattern"] == "2:4"]
    assert sparse and all(name.startswith("backbone.layer") for name in sparse) and "backbone.conv1" not in sparse


def test_lbc_check_reads_the_folded_pattern_and_names_a_broken_group(det_export, tmp_path, capsys):
    assert check_main([str(det_export)]) == 0
    out = capsys.readouterr().out
    report = json.loads((det_export / "report.json").read_text())
    assert f"ok: all {report['nm_layers']} eligible layers are 2:4 ({report['nm_layers']} exactly 2 of every 4)" in out

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in DET_FILES:
        (broken / name).write_bytes((det_export / name).read_bytes())
    ckpt = torch.load(broken / "model.pth", weights_only=True)
    w = ckpt["state_dict"]["backbone.layer2.0.conv2.weight"]
    zero = (w[0, :4, 0, 0] == 0).nonzero()[0]
    w[0, int(zero), 0, 0] = 1.0  # a third non-zero in one group of 4
    torch.save(ckpt, broken / "model.pth")
    assert check_main([str(broken), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backbone.layer2.0.conv2 (1 of" in err

    del ckpt["state_dict"]["neck.fpn_convs.0.conv.weight"]  # weights that are not config.py's model
    torch.save(ckpt, broken / "model.pth")
    assert check_main([str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 missing key ('neck.fpn_convs.0.conv.weight')" in err


def test_detection_export_bad_inputs_are_one_line(det_run, det_export, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in det_run.iterdir() if p.is_file()}
    for args, expected in (
        ([str(det_run), "--out", str(det_run)], "is a run directory (it holds metrics.jsonl)"),
        ([str(det_run), "--out", str(tmp_path / "x"), "--onnx"], "--onnx is not supported for task=detection"),
        ([str(det_run), "--out", str(tmp_path / "x"), "--ema"], "--ema is not supported for task=detection"),
    ):
        assert export_main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert {p.name: p.read_bytes() for p in det_run.iterdir() if p.is_file()} == before
    junk = tmp_path / "epoch_9.pth"
    junk.write_bytes(b"not a checkpoint")
    assert export_main([str(junk), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a readable checkpoint" in err
    # an earlier detection export is replaced, whole
    assert export_main([str(det_run / CHECKPOINT), "--out", str(det_export), "--quiet"]) == 0
    assert sorted(p.name for p in det_export.iterdir()) == sorted(DET_FILES)

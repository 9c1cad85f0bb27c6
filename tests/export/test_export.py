"""lbc-export: the exported plain model computes what the masked training model computes; ONNX matches; bad input
is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.nn.utils import parametrize

import lbc
from lbc.cli.export import main
from lbc.export import load_exported
from lbc.io import read_pt
from lbc.models import build_model


def masked_training_model(run_dir: Path, ema: bool = False) -> torch.nn.Module:
    """The model as the trainer has it at the end of the run: built, method attached, checkpoint loaded; eval mode."""
    ckpt = read_pt(run_dir / "last.pt", "test")
    cfg = ckpt["config"]
    model = build_model(num_classes=cfg["data"]["num_classes"], **cfg["model"])
    sp = lbc.sparsify(model, **cfg["sparsity"])
    state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items()} if ema else ckpt["model"]
    model.load_state_dict(state)
    sp.load_state_dict(ckpt["sparsity"])
    return model.eval()


def plain_model(out: Path) -> torch.nn.Module:
    """The export loaded by hand: the model built from config.yaml, load_state_dict of the safetensors (strict)."""
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    model = build_model(num_classes=cfg["num_classes"], **cfg["model"])
    model.load_state_dict(load_file(out / "model.safetensors"))
    return model.eval()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lbc", "srste", "asp"])
def test_export_outputs_equal_the_masked_training_model(method, trained, tmp_path, capsys):
    run_dir, out = trained(method), tmp_path / "exported"
    assert main([str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layers.1.0.conv2" in printed and "14 layers exactly 2:4" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "report.json"]
    assert "config.yaml (with preprocess, classes)" in printed
    cfg = yaml.safe_load((out / "config.yaml").read_text())  # how to feed the model (tests/export/test_preprocess.py)
    assert cfg["classes"] == [str(d) for d in range(10)] and cfg["preprocess"]["input_size"] == [3, 32, 32]

    weights = load_file(out / "model.safetensors")
    assert not any("parametrizations" in k or "scores" in k or k.endswith(".mask") for k in weights)
    exported = plain_model(out)
    assert not any(parametrize.is_parametrized(m) for m in exported.modules())
    assert set(weights) == set(build_model("resnet_small", num_classes=10).state_dict())

    trained_model = masked_training_model(run_dir)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), trained_model(x), rtol=1e-5, atol=1e-6)
    stored = read_pt(run_dir / "last.pt", "test")["model"]["layers.1.0.conv2.weight"]
    if method == "srste":  # the stored weights were never masked: the export had to fold the masks in
        assert (stored != 0).float().mean() > 0.9 and (weights["layers.1.0.conv2.weight"] != 0).float().mean() == 0.5
    else:  # ASP's prune and LBC's removals (removal=paper) fold the mask into the stored weight as they train
        assert torch.equal(stored, weights["layers.1.0.conv2.weight"])

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["exact_nm"] and report["nm_layers"] == 14
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv1"]["pattern"] == "dense" and "excluded" in rows["conv1"]["reason"]
    assert rows["layers.1.0.conv2"] == {"name": "layers.1.0.conv2", "shape": [32, 32, 3, 3], "pattern": "2:4",
                                        "density": 0.5, "nm": True, "exact_nm": True, "groups": 2304,
                                        "violating_groups": 0}


@pytest.mark.slow
def test_ema_export_is_the_ema_model(trained, tmp_path, capsys):
    run_dir, out = trained("lbc"), tmp_path / "ema"
    assert main([str(run_dir), "--out", str(out), "--ema", "--quiet"]) == 0
    assert "ema weights" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = plain_model(out)(x)
        torch.testing.assert_close(got, masked_training_model(run_dir, ema=True)(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, masked_training_model(run_dir)(x))  # not the model's own weights
    assert json.loads((out / "report.json").read_text())["weights"] == "ema"

    assert main([str(trained("srste")), "--out", str(tmp_path / "x"), "--ema"]) == 2  # that run kept no EMA
    assert "trainer.ema" in one_line_error(capsys)


@pytest.mark.slow
def test_onnx_run_by_onnxruntime_matches_pytorch(lbc_export):
    import onnxruntime as ort

    report = json.loads((lbc_export / "report.json").read_text())
    assert report["onnx"]["onnxruntime_max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(lbc_export / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_exported(lbc_export)
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_export_without_onnx_removes_a_stale_onnx_file(lbc_export, trained, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(lbc_export, out)
    assert (out / "model.onnx").is_file()
    assert main([str(trained("lbc")), "--out", str(out), "--quiet"]) == 0
    assert not (out / "model.onnx").exists() and "onnx" not in json.loads((out / "report.json").read_text())


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such run directory" in one_line_error(capsys)
    (tmp_path / "empty_run").mkdir()
    assert main([str(tmp_path / "empty_run"), "--out", out]) == 2
    assert "without last.pt" in one_line_error(capsys)
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    assert main([str(tmp_path / "notes.pt"), "--out", out]) == 2
    one_line_error(capsys)
    torch.save(build_model("resnet_small", num_classes=10).state_dict(), tmp_path / "plain.pt")
    assert main([str(tmp_path / "plain.pt"), "--out", out]) == 2
    assert "not an lbc training checkpoint" in one_line_error(capsys)
    detection = {"model": {}, "sparsity": {}, "config": {"model": {"name": "faster_rcnn_r50_fpn",
                                                                   "mmdet_config": "x.py"}, "sparsity": {}}}
    torch.save(detection, tmp_path / "det.pt")
    assert main([str(tmp_path / "det.pt"), "--out", out]) == 2
    assert "detection run" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_truncated_checkpoint_and_unusable_out_are_one_line_errors(trained, tmp_path, capsys):
    data = (trained("srste") / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert main([str(tmp_path / "cut.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "not a readable checkpoint" in one_line_error(capsys)
    (tmp_path / "file").write_text("")
    assert main([str(trained("srste")), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_line_error(capsys)

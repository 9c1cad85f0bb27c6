"""Every bad input of lbc-export, lbc-check and tools/convert_backbone.py is exactly one line on stderr naming
it, exit status 2 (1 for a write the storage refuses), no traceback, no warning, and nothing of a run touched
(issue 20). One table per command, as tests/cli/test_bad_values.py does for lbc-train."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import save_file

from lbc.cli import check as lbc_check
from lbc.cli import export as lbc_export
from lbc.models import build_model
from tests.helpers import PYTHON, ROOT

CONVERT = ROOT / "tools" / "convert_backbone.py"


def _convert_main() -> Callable[[list[str]], int]:
    spec = importlib.util.spec_from_file_location("convert_backbone", CONVERT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


class Shell:
    """A pickle whose loading would run a shell command (``os.system``)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): a refused command must leave it as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files the tables refer to by name (``{t}/<name>``), made once: every case must leave them as they are."""
    t = tmp_path_factory.mktemp("world")
    (t / "notes.txt").write_text("not a checkpoint\n")
    (t / "bare4.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    (t / "bare5.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=5))
    (t / "shell.pkl").write_bytes(pickle.dumps(Shell(), protocol=4))
    torch.save({"model": Shell()}, t / "shell.pt")
    small = build_model("resnet_small", num_classes=10).state_dict()
    torch.save(small, t / "plain.pt")
    (t / "empty_dir").mkdir()
    # a classification run, still training: lbc-train's files (the export must never write among them)
    run = t / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "config.yaml").write_text("model:\n  name: resnet_small\ndata:\n  num_classes: 10\nseed: 0\n")
    (run / "last.pt").write_bytes(b"the run's checkpoint")
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run / ".lock").write_text("")
    started = t / "started"  # a run that has only begun: Hydra's folder, its config, the lock
    (started / ".hydra").mkdir(parents=True)
    (started / "config.yaml").write_text("model:\n  name: resnet_small\nseed: 0\n")
    (started / ".lock").write_text("")
    det = t / "det_run"  # a detection run: mmengine's checkpoints and last_checkpoint
    det.mkdir()
    (det / "epoch_1.pth").write_bytes(b"mmengine checkpoint")
    (det / "last_checkpoint").write_text(str(det / "epoch_1.pth"))
    (det / "config.yaml").write_text("task:\n  name: detection\n")
    mixed = t / "mixed"  # a previous export next to a file of the user's
    mixed.mkdir()
    (mixed / "report.json").write_text("{}\n")
    (mixed / "notes.txt").write_text("mine\n")
    only_config = t / "only_config"  # a run's config.yaml and nothing else
    only_config.mkdir()
    (only_config / "config.yaml").write_text("model:\n  name: resnet_small\nseed: 0\n")
    (t / "a_file").write_text("x")
    # a classification export (as lbc-export writes it) and copies with an edited config.yaml
    export = t / "export"
    export.mkdir()
    save_file(small, export / "model.safetensors")
    config = {"model": {"name": "resnet_small"}, "num_classes": 10, "input_size": [3, 32, 32],
              "sparsity": {"method": "lbc", "pattern": "2:4", "exclude": ["conv1"]}}
    (export / "config.yaml").write_text(yaml.safe_dump(config))
    for name, edit in (("classes_abc", {"num_classes": "ten"}), ("classes_neg", {"num_classes": -3}),
                       ("classes_float", {"num_classes": 2.5}), ("classes_5", {"num_classes": 5}),
                       ("classes_bool", {"num_classes": True}), ("model_nope", {"model": {"name": "nope"}}),
                       ("model_list", {"model": {"name": ["resnet_small"]}})):
        edited = t / name
        edited.mkdir()
        save_file(small, edited / "model.safetensors")
        (edited / "config.yaml").write_text(yaml.safe_dump({**config, **edit}))
    torch.save(torchvision.models.resnet34().state_dict(), t / "r34.pt")
    torch.save(torchvision.models.resnet18().state_dict(), t / "r18.pt")
    return t


def run_in_process(main: Callable[[list[str]], int], args: list[str], capsys) -> tuple[int, str, str, list]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(args)
    out, err = capsys.readouterr()
    return code, out, err, [str(w.message) for w in seen]


def assert_one_line(code: int, err: str, out: str, seen: list, status: int, expected: str) -> None:
    lines = err.splitlines()
    assert code == status, (code, err, out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err + out and "weights_only" not in err
    assert seen == [], seen


# --- lbc-export ---------------------------------------------------------------------------------------------

EXPORT_CASES: list[tuple[str, list[str], str, str]] = [
    # (id, arguments ({t}: the world), what the line says, the folder that must stay as it was)
    ("missing source", ["{t}/nope", "--out", "{t}/out"], "no such run directory", ""),
    ("dir without last.pt", ["{t}/empty_dir", "--out", "{t}/out"], "without last.pt", ""),
    ("text file", ["{t}/notes.txt", "--out", "{t}/out"], "is not a readable checkpoint", ""),
    ("bare pickle 4", ["{t}/bare4.pkl", "--out", "{t}/out"], "is not a readable checkpoint", ""),
    ("bare pickle 5", ["{t}/bare5.pkl", "--out", "{t}/out"], "is not a readable checkpoint", ""),
    ("pickled code (bare)", ["{t}/shell.pkl", "--out", "{t}/out"], f"it needs {os.system.__module__}.system", ""),
    ("pickled code (torch)", ["{t}/shell.pt", "--out", "{t}/out"], f"it needs {os.system.__module__}.system", ""),
    ("a plain state dict", ["{t}/plain.pt", "--out", "{t}/out"], "not an lbc training checkpoint", ""),
    ("opset", ["{t}/run", "--out", "{t}/out", "--opset", "3"], "--opset 3", "run"),
    ("batch", ["{t}/run", "--out", "{t}/out", "--batch", "0"], "--batch 0", "run"),
    ("input size", ["{t}/run", "--out", "{t}/out", "--input-size", "3", "0", "8"], "--input-size", "run"),
    ("--out a file", ["{t}/run", "--out", "{t}/a_file"], "is a file", "run"),
    ("--out the run", ["{t}/run", "--out", "{t}/run"], "is a run directory (it holds last.pt)", "run"),
    ("--out the run, its checkpoint", ["{t}/run/last.pt", "--out", "{t}/run"], "is a run directory", "run"),
    ("--out another run", ["{t}/plain.pt", "--out", "{t}/run"], "is a run directory", "run"),
    ("--out a run just started", ["{t}/run", "--out", "{t}/started"], "is a run directory (it holds .lock)", "started"),
    ("--out a detection run", ["{t}/run", "--out", "{t}/det_run"], "is a run directory (it holds last_checkpoint)",
     "det_run"),
    ("--out a run's config.yaml", ["{t}/run", "--out", "{t}/only_config"], "(it holds config.yaml, a run's config)",
     "only_config"),
    ("--out with a user's file", ["{t}/run", "--out", "{t}/mixed"], "holds files an export does not write (notes.txt)",
     "mixed"),
]


@pytest.mark.parametrize("name, args, expected, kept", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_lbc_export_bad_input_is_one_line_and_touches_nothing(world: Path, capsys, name, args, expected, kept):
    before = snapshot(world / kept) if kept else None
    code, out, err, seen = run_in_process(lbc_export.main, [a.format(t=world) for a in args], capsys)
    assert_one_line(code, err, out, seen, 2, expected)
    if kept:
        assert snapshot(world / kept) == before  # byte for byte: nothing written, nothing removed
    assert not (world / "out").exists()


# --- lbc-check ----------------------------------------------------------------------------------------------

CHECK_CASES: list[tuple[str, list[str], str]] = [
    ("empty pattern", ["{t}/export", "--pattern", ""], "--pattern='' is not an N:M pattern"),
    ("pattern 4:4", ["{t}/export", "--pattern", "4:4"], "--pattern=4:4 is not allowed"),
    ("pattern word", ["{t}/export", "--pattern", "half"], "--pattern='half'"),
    ("num classes 0", ["{t}/r18.pt", "--model", "resnet18", "--num-classes", "0"], "--num-classes 0"),
    ("num classes -3", ["{t}/r18.pt", "--model", "resnet18", "--num-classes", "-3"], "--num-classes -3"),
    ("resnet18 on resnet34 weights", ["{t}/r34.pt", "--model", "resnet18"],
     "the weights are not of this model: 96 unexpected keys ('layer1.2.conv1.weight', ...)"),
    ("resnet34 on resnet18 weights", ["{t}/r18.pt", "--model", "resnet34"],
     "the weights are not of this model: 96 missing keys ('layer1.2.conv1.weight', ...)"),
    ("resnet18 with other classes", ["{t}/r18.pt", "--model", "resnet18", "--num-classes", "5"],
     "fc.weight has shape [1000, 512], the model's is [5, 512]"),
    ("resnet_small on resnet18", ["{t}/r18.pt", "--model", "resnet_small"], "not of this model"),
    ("unknown model", ["{t}/r18.pt", "--model", "nope_net"], "nope_net"),
    ("model options without model", ["{t}/r18.pt", "--model-option", "img_size=32"], "need --model"),
    ("edited num_classes: a word", ["{t}/classes_abc"], "num_classes='ten' is not allowed"),
    ("edited num_classes: negative", ["{t}/classes_neg"], "num_classes=-3 is not allowed"),
    ("edited num_classes: float", ["{t}/classes_float"], "num_classes=2.5 is not allowed"),
    ("edited num_classes: bool", ["{t}/classes_bool"], "num_classes=True is not allowed"),
    ("edited num_classes: 5", ["{t}/classes_5"], "fc.weight has shape [10, 64], the model's is [5, 64]"),
    ("edited model.name", ["{t}/model_nope"], "nope"),
    ("edited model.name: a list", ["{t}/model_list"], "is not a model name"),
    ("bare pickle 4", ["{t}/bare4.pkl"], "WEIGHTS="),
    ("bare pickle 5", ["{t}/bare5.pkl"], "WEIGHTS="),
    ("pickled code", ["{t}/shell.pkl"], f"it needs {os.system.__module__}.system"),
    ("pickled code (torch)", ["{t}/shell.pt"], f"it needs {os.system.__module__}.system"),
    ("text", ["{t}/notes.txt"], "WEIGHTS="),
    ("missing", ["{t}/nope.safetensors"], "no such file"),
    ("empty export dir", ["{t}/empty_dir"], "no such file"),
]


@pytest.mark.parametrize("name, args, expected", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_lbc_check_bad_input_is_one_line(world: Path, capsys, name, args, expected):
    code, out, err, seen = run_in_process(lbc_check.main, [a.format(t=world) for a in args], capsys)
    assert_one_line(code, err, out, seen, 2, expected)


def test_lbc_check_still_accepts_the_models_own_weights(world: Path, capsys):
    """The strict key check refuses foreign weights only: a model's own state dict is checked (dense: exit 1)."""
    code, out, err, _ = run_in_process(lbc_check.main, [str(world / "r18.pt"), "--model", "resnet18"], capsys)
    assert code == 1 and "eligible layers are not 2:4" in err and err.count("\n") == 1
    code, out, err, _ = run_in_process(lbc_check.main, [str(world / "export")], capsys)
    assert code == 1 and "model resnet_small from" in out


# --- tools/convert_backbone.py ------------------------------------------------------------------------------

CONVERT_CASES: list[tuple[str, list[str], int, str]] = [
    ("missing checkpoint", ["{t}/nope.pt", "--out", "{t}/b.safetensors"], 2, "checkpoint="),
    ("text checkpoint", ["{t}/notes.txt", "--out", "{t}/b.safetensors"], 2, "checkpoint="),
    ("bare pickle 4", ["{t}/bare4.pkl", "--out", "{t}/b.safetensors"], 2, "checkpoint="),
    ("bare pickle 5", ["{t}/bare5.pkl", "--out", "{t}/b.safetensors"], 2, "checkpoint="),
    ("pickled code", ["{t}/shell.pkl", "--out", "{t}/b.safetensors"], 2, f"it needs {os.system.__module__}.system"),
    ("not a resnet", ["{t}/plain.pt", "--out", "{t}/b.safetensors"], 2, "checkpoint="),
    ("--out under a file", ["{t}/r18.pt", "--out", "{t}/a_file/b.safetensors"], 2, "is a file, not a directory"),
    ("--out deep under a file", ["{t}/r18.pt", "--out", "{t}/a_file/x/y/b.pt"], 2, "is a file, not a directory"),
    ("--out a directory", ["{t}/r18.pt", "--out", "{t}/empty_dir"], 2, "is a directory"),
    ("--out another suffix", ["{t}/r18.pt", "--out", "{t}/b.txt"], 2, "write a .safetensors"),
    # /sys refuses new files to everyone, root included: the write's own error, a runtime failure
    ("--out unwritable", ["{t}/r18.pt", "--out", "/sys/lbc_test_backbone.safetensors"], 1,
     "cannot write /sys/lbc_test_backbone.safetensors: permission denied (EACCES); nothing was written"),
]


@pytest.mark.parametrize("name, args, status, expected", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_backbone_bad_input_is_one_line(world: Path, capsys, name, args, status, expected):
    before = snapshot(world)
    code, out, err, seen = run_in_process(_convert_main(), [a.format(t=world) for a in args], capsys)
    assert_one_line(code, err, out, seen, status, expected)
    assert snapshot(world) == before


# --- the real stderr of the three commands: torch's pickle-protocol warnings do not leak ---------------------


@pytest.mark.parametrize("command", ["lbc-export", "lbc-check", "convert_backbone"])
def test_a_bare_pickle_is_exactly_one_stderr_line_in_a_subprocess(tmp_path: Path, command: str):
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=5))  # torch warns about protocol 5 while it reads
    argv = {"lbc-export": ["-m", "lbc.cli.export", str(path), "--out", str(tmp_path / "out")],
            "lbc-check": ["-m", "lbc.cli.check", str(path)],
            "convert_backbone": [str(CONVERT), str(path), "--out", str(tmp_path / "b.safetensors")]}[command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([PYTHON, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and str(path) in lines[0] and "Warning" not in done.stderr


@pytest.mark.slow
def test_exporting_into_a_real_run_is_refused_and_an_earlier_export_is_replaced(trained, tmp_path, capsys):
    run = trained("srste")
    before = snapshot(run)
    for out in (run, run / ".hydra"):  # the run itself, and a folder of the run's
        code, stdout, err, seen = run_in_process(lbc_export.main, [str(run), "--out", str(out), "--quiet"], capsys)
        assert_one_line(code, err, stdout, seen, 2, f"--out {str(out)!r}")
    assert snapshot(run) == before  # config.yaml, last.pt, metrics.jsonl: byte for byte
    out = tmp_path / "export"
    assert lbc_export.main([str(run), "--out", str(out), "--quiet"]) == 0
    first = snapshot(out)
    assert sorted(first) == ["config.yaml", "model.safetensors", "report.json"]
    assert lbc_export.main([str(run / "last.pt"), "--out", str(out), "--quiet"]) == 0  # an earlier export: replaced
    assert sorted(snapshot(out)) == sorted(first)
    (out / "notes.txt").write_text("mine\n")
    code, stdout, err, seen = run_in_process(lbc_export.main, [str(run), "--out", str(out)], capsys)
    assert_one_line(code, err, stdout, seen, 2, "holds files an export does not write (notes.txt)")


@pytest.mark.slow
def test_a_full_disk_during_an_export_is_one_line_and_the_earlier_export_stays(trained, tmp_path, capsys,
                                                                               monkeypatch):
    import errno

    import safetensors.torch

    run, out = trained("srste"), tmp_path / "export"
    assert lbc_export.main([str(run), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    code, stdout, err, seen = run_in_process(lbc_export.main, [str(run), "--out", str(out), "--quiet"], capsys)
    assert_one_line(code, err, stdout, seen, 1, f"cannot write {out / 'model.safetensors'}: no space left on the "
                                                "device (ENOSPC); the previous file is unchanged")
    assert snapshot(out) == before  # the earlier export whole, no temp file left

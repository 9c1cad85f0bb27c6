"""The one run lifecycle (lbc/run/lifecycle.py): claim, begin (config.yaml, record, start line), stop, done,
close (a failed start leaves nothing behind), and that every runner goes through it instead of its own copy."""

from __future__ import annotations

import ast
import json
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from lbc.errors import ConfigError
from lbc.run import rundir
from lbc.run.lifecycle import Run, done_line, start_line
from lbc.run.records import METRICS_FILE, read_metrics
from lbc.run.signals import Stopped
from tests.helpers import ROOT, TINY, compose_config


def config(run_dir: Path, *more: str):
    return compose_config([*TINY, f"run_dir={run_dir}", *more])


# --- the lines ---------------------------------------------------------------------------------------


def test_start_line(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run")
    assert start_line(cfg, "cpu", "2 epochs x 3 steps") == (
        f"lbc: resnet_small on digits, sparsity lbc, cpu, 1 process(es), 2 epochs x 3 steps; run dir {tmp_path / 'run'}")
    assert start_line(cfg, "cuda:0", "6 epochs", resumed_from="r/last.pt", resumed_epoch=4).endswith(
        f"cuda:0, 1 process(es), 6 epochs, resuming from r/last.pt at epoch 4; run dir {tmp_path / 'run'}")
    assert ", resuming from r/epoch_x.pth; run dir" in start_line(cfg, "cpu", "6 epochs", "r/epoch_x.pth", None)


def test_done_line() -> None:
    result = {"top1": 55.0, "sparsity/density": 0.5031, "sparsity/exact_nm": 1.0, "run_dir": "out/x"}
    assert done_line("top-1 55.00%", result) == (
        "done: top-1 55.00%  |  sparsity: density 0.5031  exact_nm 1.0000  |  run dir: out/x")
    assert done_line("mAP n/a", {"run_dir": "r"}) == "done: mAP n/a  |  sparsity: n/a  |  run dir: r"


# --- the run object ------------------------------------------------------------------------------------


def test_claim_begin_done_close(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS_FILE).write_text('{"epoch": 1, "step": 3}\n{"epoch": 2, "step": 6}\n{"epoch": 3, "st')
    cfg = config(run_dir)
    with caplog.at_level(logging.INFO, logger="lbc"), Run.claim(cfg) as run:
        assert run.run_dir == run_dir and cfg.run_dir == str(run_dir) and run.lock is not None and run.lock.held
        with pytest.raises(ConfigError, match="is in use by pid"):  # one run at a time
            Run.claim(config(run_dir))
        run.begin("cpu", "2 epochs x 3 steps", resumed_from=str(run_dir / "last.pt"), resumed_epoch=1)
        assert read_metrics(run_dir) == [{"epoch": 1, "step": 3}]  # records after the resumed epoch dropped
        saved = OmegaConf.load(run_dir / "config.yaml")
        assert saved.run_dir == str(run_dir) and "${" not in (run_dir / "config.yaml").read_text()  # resolved
        run.record.append({"epoch": 2, "step": 6, "top1": 50.0})
        result = run.done("top-1 50.00%", {"top1": 50.0, "sparsity/density": 0.5})
    assert result == {"top1": 50.0, "sparsity/density": 0.5, "run_dir": str(run_dir)}
    assert [r.getMessage() for r in caplog.records] == [
        f"lbc: resnet_small on digits, sparsity lbc, cpu, 1 process(es), 2 epochs x 3 steps, resuming from "
        f"{run_dir / 'last.pt'} at epoch 1; run dir {run_dir}",
        f"done: top-1 50.00%  |  sparsity: density 0.5000  |  run dir: {run_dir}"]
    assert not run.lock.held
    rundir.acquire(run_dir).release()  # given back
    run.close()  # twice: a no-op


def test_a_fresh_begin_drops_every_old_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS_FILE).write_text('{"epoch": 1, "step": 3}\n')
    with Run.claim(config(run_dir)) as run:
        run.begin("cpu", "2 epochs")
    assert read_metrics(run_dir) == []


def test_a_failed_start_removes_what_the_run_added_and_nothing_else(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "train.log").write_text("")
    (run_dir / "mine.txt").write_text("was here before")
    with pytest.raises(RuntimeError, match="boom"), Run.claim(config(run_dir)) as run:
        run.begin("cpu", "2 epochs", tensorboard=True)
        (run_dir / "20260101_000000").mkdir()  # a log folder of the task's
        raise RuntimeError("boom")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".lock", "mine.txt", "train.log"]
    assert not run.lock.held
    assert not rundir.remove_if_unused(run_dir)  # mine.txt: a directory with something else in it stays
    (run_dir / "mine.txt").unlink()
    assert rundir.remove_if_unused(run_dir) and not run_dir.exists()  # what lbc-train does next


@pytest.mark.parametrize("how", ["started", "stopped"])
def test_after_the_first_step_or_on_a_stop_nothing_is_removed(tmp_path: Path, how: str) -> None:
    run_dir = tmp_path / "run"
    error = RuntimeError("later") if how == "started" else Stopped("stopped by SIGTERM", "SIGTERM", 143)
    with pytest.raises(type(error)), Run.claim(config(run_dir)) as run:
        run.begin("cpu", "2 epochs")
        run.started = how == "started"
        raise error
    assert (run_dir / "config.yaml").is_file()


def test_stopped_is_the_one_line_and_the_exit_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Run.claim(config(tmp_path / "run")) as run, run.stop:
        run.stop.request(signal.SIGINT)
        with caplog.at_level(logging.INFO, logger="lbc"):
            stopped = run.stopped(epoch=1, step=0, written=False, checkpoint=None)
    line = ("stopped by SIGINT at epoch 1 step 0; the partial epoch is dropped and no checkpoint was written "
            "(the same command starts the run over)")
    assert isinstance(stopped, Stopped) and str(stopped) == line and stopped.exit_code == 130
    assert stopped.signal_name == "SIGINT" and caplog.messages == [line]


# --- every runner uses it --------------------------------------------------------------------------------

RUNNERS = ["lbc/engine/trainer.py", "lbc/detection/runner.py"]
# What only the lifecycle may do: a runner that does any of these again has grown its own copy.
LIFECYCLE_ONLY = {"GracefulStop(", "stop_message", "rundir", "share(", "broadcast_object", "MetricsRecord(",
                  "remove_if_unused", "BOOKKEEPING", "config.yaml", "metrics.jsonl", "done: ", "lbc: ", "Stopped("}


@pytest.mark.parametrize("path", RUNNERS)
def test_each_runner_goes_through_the_run_object(path: str) -> None:
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert ("lbc.run.lifecycle", "Run") in imported
    called = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute)}
    assert {"claim", "begin", "stopped", "done"} <= called, path
    for node in ast.walk(tree):  # the code without its docstrings (unparse drops the comments)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    code = ast.unparse(tree)
    assert not [s for s in LIFECYCLE_ONLY if s in code], path


def test_classification_calls_the_steps_in_order_on_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lbc.engine.trainer as trainer

    calls: list[tuple[str, int]] = []
    for name in ("begin", "stopped", "done", "close"):
        real = getattr(Run, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, id(self)))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Run, name, spy)
    result = trainer.run(config(tmp_path / "run"))
    assert [c[0] for c in calls] == ["begin", "done", "close"] and len({c[1] for c in calls}) == 1
    records = read_metrics(tmp_path / "run")
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 3), (2, 6)]  # trainer=smoke: 3 steps an epoch
    assert {k for k in records[-1] if k.startswith("sparsity/")} == {k for k in result if k.startswith("sparsity/")}
    assert {"sparsity/density", "sparsity/exact_nm"} <= records[-1].keys()


def test_detection_records_have_the_same_schema(tmp_path: Path) -> None:
    """The detection hook's record: epoch, step (iterations), mmengine's metric names, sparsity/<name>."""
    pytest.importorskip("mmdet")
    import torch
    from torch import nn

    import lbc
    from lbc.detection.hook import SparsityHook

    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 8, 8, 8))  # the stem and the classifier stay dense by default: the middle conv is 2:4
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=1)
    runner = SimpleNamespace(model=SimpleNamespace(sparsity=sp), epoch=2, iter=40, work_dir=str(tmp_path))
    SparsityHook().after_val_epoch(runner, {"coco/bbox_mAP": 0.25, "coco/bbox_mAP_50": float("nan")})
    (record,) = [json.loads(ln) for ln in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert record["epoch"] == 2 and record["step"] == 40 and record["coco/bbox_mAP"] == 0.25
    assert record["coco/bbox_mAP_50"] is None
    scalars = {f"sparsity/{k}" for k in sp.report()["scalars"]}
    assert scalars and {k for k in record if k.startswith("sparsity/")} == scalars
    assert not scalars & {k.removeprefix("sparsity/") for k in record}  # no bare names any more

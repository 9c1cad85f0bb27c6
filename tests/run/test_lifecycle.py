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


def test_evaluated_writes_the_record_and_logs_the_line_built_from_it(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with Run.claim(config(tmp_path / "run")) as run:
        run.begin("cpu", "2 epochs")
        with caplog.at_level(logging.INFO, logger="lbc"):
            caplog.clear()  # the start line, when an earlier test left lbc's logger at INFO
            written = run.evaluated({"epoch": 1, "step": 3, "train_loss": 0.5, "top1": float("nan"), "top5": 75.0,
                                     "lr": 0.1, "seconds": 1.26, "sparsity/density": 0.5}, 2)
            run.evaluated({"epoch": 1, "step": 20, "ppl": 18.0449, "sparsity/density": 0.5}, 30, unit="step")
    assert read_metrics(tmp_path / "run")[0] == written and written["top1"] is None  # NaN: null, in both
    assert caplog.messages == ["epoch 1/2: loss 0.5000  top-1 n/a  top-5 75.00  lr 1.00e-01  density 0.500  1.3s",
                               "step 20/30: ppl 18.04  density 0.500"]


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

RUNNERS = ["lbc/engine/trainer.py", "lbc/detection/runner.py", "lbc/lm/runner.py"]
# What only the lifecycle may do: a runner that does any of these again has grown its own copy (its own
# record writer, or an evaluation line of its own beside the record: run.evaluated does both). Strings as
# ast.unparse writes them ('done: ...', f'done: ...'), so that a variable named done is no match.
LIFECYCLE_ONLY = {"GracefulStop(", "stop_message", "rundir", "share(", "broadcast_object", "MetricsRecord(",
                  "remove_if_unused", "BOOKKEEPING", "config.yaml", "metrics.jsonl", "'done: ", "'lbc: ", "Stopped(",
                  "record.append(", "progress_line", "epoch %d/", "step %d/", "top-1 %", "ppl %"}


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


def detection_runner(tmp_path: Path, sp: object, hub_name: str) -> SimpleNamespace:
    """What SparsityHook reads of mmengine's Runner, with a real MessageHub (RuntimeInfoHook's scalars)."""
    from mmengine.logging import MessageHub

    logged: list[str] = []
    return SimpleNamespace(model=SimpleNamespace(sparsity=sp), epoch=0, iter=0, max_epochs=6, work_dir=str(tmp_path),
                           message_hub=MessageHub(hub_name), logger=SimpleNamespace(info=logged.append),
                           logged=logged)


def test_detection_records_have_the_same_schema(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The detection hook's record: epoch, step (iterations), the training figures since the last record (the
    message hub's train/loss and train/lr), mmengine's metric names, sparsity/<name>; its line, from the record."""
    pytest.importorskip("mmdet")
    import torch
    from torch import nn

    import lbc
    from lbc.detection.hook import SparsityHook

    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 8, 8, 8))  # the stem and the classifier stay dense by default: the middle conv is 2:4
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=1)
    runner = detection_runner(tmp_path, sp, "test_detection_records")
    hook = SparsityHook()
    hook.before_train(runner)
    for i, loss in enumerate([4.0, 3.0, 2.0, 1.0, 0.5, 0.25]):  # two epochs of 3 iterations
        runner.message_hub.update_scalar("train/lr", 0.02 / (i + 1))
        runner.message_hub.update_scalar("train/loss", loss)
        runner.iter = i + 1
        if runner.iter % 3 == 0:
            runner.epoch = runner.iter // 3
            with caplog.at_level(logging.INFO, logger="lbc"):
                hook.after_val_epoch(runner, {"coco/bbox_mAP": 0.25 * runner.epoch, "coco/bbox_mAP_50": float("nan")})
    first, second = [json.loads(ln) for ln in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert (first["epoch"], first["step"], second["epoch"], second["step"]) == (1, 3, 2, 6)
    assert first["train_loss"] == pytest.approx(3.0) and second["train_loss"] == pytest.approx(0.5833333)  # per epoch
    assert first["lr"] == pytest.approx(0.02 / 3) and second["lr"] == pytest.approx(0.02 / 6)
    assert 0 <= first["seconds"] < 60 and second["coco/bbox_mAP"] == 0.5 and second["coco/bbox_mAP_50"] is None
    scalars = {f"sparsity/{k}" for k in sp.report()["scalars"]}
    assert scalars and {k for k in second if k.startswith("sparsity/")} == scalars
    assert not scalars & {k.removeprefix("sparsity/") for k in second}  # no bare names any more
    density = f"{second['sparsity/density']:.3f}"
    assert [m for m in caplog.messages if m.startswith("epoch ")] == [
        f"epoch 1/6: loss 3.0000  bbox_mAP 0.250  lr 6.67e-03  density {density}  {first['seconds']:.1f}s",
        f"epoch 2/6: loss 0.5833  bbox_mAP 0.500  lr 3.33e-03  density {density}  {second['seconds']:.1f}s"]
    assert runner.logged == []  # lbc's logger has handlers (pytest's, lbc-train's): the line went there


def test_detection_line_goes_to_mmengines_logger_in_a_plain_mmdet_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without logging set up for lbc (no handler on the way to the root), the line goes to runner.logger."""
    pytest.importorskip("mmdet")
    from torch import nn

    import lbc
    from lbc.detection.hook import SparsityHook

    lbc_log = logging.getLogger("lbc")
    monkeypatch.setattr(lbc_log, "propagate", False)
    monkeypatch.setattr(lbc_log, "handlers", [])
    sp = lbc.sparsify(nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3)), method="dense")
    runner = detection_runner(tmp_path, sp, "test_detection_plain")
    runner.epoch, runner.iter = 1, 0
    SparsityHook().after_val_epoch(runner, {"coco/bbox_mAP": 0.125})  # runner.val() alone: no training figures
    assert runner.logged == ["epoch 1/6: bbox_mAP 0.125  density 1.000"]

"""``lbc-train task=detection`` stopped by a real SIGTERM around an epoch's validation keeps that epoch's
``metrics.jsonl`` record, and the resume neither repeats nor drops it (issue 20); a sparsity schedule that
ends past the epochs trained is reported as what the last checkpoint holds (``exact_nm 0``), with the
method's warning on the console."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT

pytestmark = pytest.mark.slow

TINY = ["task=detection", "data.train_images=8", "data.val_images=4", "data.image_size=64", "data.batch_size=4",
        "data.val_batch_size=2", "schedule.milestones=[]", "schedule.warmup_iters=2", "trainer.log_interval=1",
        "trainer.progress=false"]
DONE = re.compile(r"^done: .*\|  sparsity: density (\S+)  exact_nm (\S+) ", re.M)

# Runs lbc-train in a subprocess whose SparsityHook sends this process a real SIGTERM at one moment of
# epoch 1: "val" at its first validation batch (after the epoch's checkpoint), "epoch_end" after its
# last training iteration (before the checkpoint is written and the validation runs).
KILLER = """
import os, signal, sys
from lbc.detection.hook import SparsityHook
moment = sys.argv[1]
def kill(self, runner, *args, **kwargs):
    if runner.epoch == (1 if moment == "val" else 0) and not getattr(SparsityHook, "sent", False):
        SparsityHook.sent = True
        os.kill(os.getpid(), signal.SIGTERM)
setattr(SparsityHook, "before_val_iter" if moment == "val" else "after_train_epoch", kill)
from lbc.cli.train import main
main(sys.argv[2:])
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("moment", ["val", "epoch_end"])
def test_a_stop_around_validation_keeps_the_epochs_record_once(moment: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = [*TINY, "schedule.epochs=2", f"data.root={tmp_path / 'shapes'}", f"run_dir={run_dir}"]
    first = subprocess.run([PYTHON, "-c", KILLER, moment, *args], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 143, (first.stdout[-3000:], first.stderr[-3000:])
    assert "Traceback" not in first.stderr
    stopped = [ln for ln in first.stdout.splitlines() if ln.startswith("stopped by SIGTERM at epoch 1")]
    assert len(stopped) == 1, first.stdout[-3000:]
    assert (run_dir / "last_checkpoint").read_text().strip().endswith("epoch_1.pth")
    rows = records(run_dir)
    assert [r["epoch"] for r in rows] == [1] and "coco/bbox_mAP" in rows[0], rows  # the validation finished

    done = subprocess.run([PYTHON, "-m", "lbc.cli.train", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert f"resuming from {run_dir / 'epoch_1.pth'}" in done.stdout, done.stdout[-2000:]
    after = records(run_dir)
    assert [r["epoch"] for r in after] == [1, 2], after  # epoch 1 exactly once: not repeated, not dropped
    assert after[0] == rows[0]  # the stopped run's record, as it wrote it
    assert [r["step"] for r in after] == [2, 4]


def test_a_schedule_past_the_epochs_is_reported_as_the_checkpoint_holds(tmp_path: Path):
    """t_f = epochs: the last update (at epoch 1 - 1/2) has removed nothing; the old end-of-training update at
    epoch 1 removed every candidate after the last checkpoint and validation, and the done line said N:M."""
    import torch

    from lbc.detection.checkpoint import mmengine_safe_globals

    run_dir = tmp_path / "run"
    args = [*TINY, "schedule.epochs=1", "sparsity=lbc", "sparsity.t_i=0", "sparsity.t_f=1",
            f"data.root={tmp_path / 'shapes'}", f"run_dir={run_dir}"]
    done = subprocess.run([PYTHON, "-m", "lbc.cli.train", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    match = DONE.search(done.stdout)
    assert match, done.stdout[-2000:]
    last = records(run_dir)[-1]
    assert float(match.group(2)) == last["sparsity/exact_nm"] == 0.0
    assert float(match.group(1)) == pytest.approx(last["sparsity/density"], abs=5e-5)
    console = done.stdout + done.stderr
    assert "before the schedule's end (t_f=1" in console and "the model is not N:M yet" in console, console[-3000:]
    # the checkpoint agrees: no LBC candidate was removed in it
    with mmengine_safe_globals():
        ckpt = torch.load(run_dir / "epoch_1.pth", map_location="cpu")
    assert ckpt["lbc_sparsity"]["removed"] == 0

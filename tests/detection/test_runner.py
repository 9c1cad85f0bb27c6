"""``lbc-train task=detection`` end to end through the real CLI on a tiny generated shapes set: a run stopped by
SIGTERM, the same command resuming it to the end (not starting over), and once more on the finished run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT

pytestmark = pytest.mark.slow

EPOCHS = 3
TINY = ["task=detection", "data.train_images=8", "data.val_images=4", "data.image_size=64", "data.batch_size=4",
        "data.val_batch_size=4", f"schedule.epochs={EPOCHS}", "schedule.milestones=[2]", "schedule.warmup_iters=2",
        "trainer.log_interval=1", "trainer.progress=false"]
EPOCH_LINE = re.compile(r"^epoch (\d+)/3: loss (\d+\.\d{4})  bbox_mAP (\d\.\d{3})  segm_mAP (\d\.\d{3})  "
                        r"lr (\d\.\d{2}e-\d{2})  density (\d\.\d{3})  (\d+\.\d)s$", re.M)
DONE = re.compile(r"^done: bbox mAP (\d\.\d{3})  segm mAP (\d\.\d{3})  \|  sparsity: density (\S+)  exact_nm (\S+)"
                  r".*\|  run dir: (.+)$", re.M)


def command(tmp_path: Path) -> list[str]:
    return [PYTHON, "-m", "lbc.cli.train", *TINY, f"data.root={tmp_path / 'shapes'}", f"run_dir={tmp_path / 'run'}"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}


def checkpoints(run_dir: Path) -> dict[str, int]:
    """Epoch checkpoint name -> modification time (ns): a resumed run must not rewrite the old ones."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(run_dir.glob("epoch_*.pth"))}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_stop_resume_finish_and_run_again(tmp_path: Path):
    run_dir = tmp_path / "run"

    # 1. SIGTERM once the first epoch's checkpoint is there: exit 143, one line saying what a resume continues from
    proc = subprocess.Popen(command(tmp_path), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "last_checkpoint").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, (out[-3000:], err[-3000:])
    assert "Traceback" not in err
    stopped = [ln for ln in out.splitlines() if ln.startswith("stopped by SIGTERM at epoch")]
    assert len(stopped) == 1 and "run the same command again" in stopped[0], out[-3000:]
    kept = checkpoints(run_dir)
    assert kept and f"epoch_{EPOCHS}.pth" not in kept, kept
    assert (run_dir / "config.yaml").is_file() and "runner: lbc.detection.runner.run" in (run_dir / "config.yaml").read_text()

    # 2. the same command resumes: the old checkpoints stay as they were, the rest of the epochs are trained
    done = subprocess.run(command(tmp_path), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    last = sorted(kept, key=lambda n: int(re.findall(r"\d+", n)[0]))[-1]
    assert f"resuming from {run_dir / last}" in done.stdout, done.stdout[-2000:]
    after = checkpoints(run_dir)
    assert all(after[k] == kept[k] for k in kept if k in after)  # not started over: none rewritten
    # trainer.max_keep_checkpoints=2 (the default): the newest two epochs, the last one named for resume
    assert sorted(after) == [f"epoch_{EPOCHS - 1}.pth", f"epoch_{EPOCHS}.pth"], after
    assert (run_dir / "last_checkpoint").read_text().strip().endswith(f"epoch_{EPOCHS}.pth")
    rows = metrics(run_dir)
    assert rows[-1]["epoch"] == EPOCHS and "coco/bbox_mAP" in rows[-1] and "coco/segm_mAP" in rows[-1]
    assert rows[-1]["sparsity/exact_nm"] == 1.0 and rows[-1]["sparsity/density"] < 1.0  # LBC 2:4 by t_f = epochs / 2
    # the record's step: iterations of the whole run (8 images / batch 4 an epoch); a stop once an epoch's
    # checkpoint is written lets its validation finish, so every epoch has exactly one record
    assert all(r["step"] == 2 * r["epoch"] for r in rows) and [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    # one line per validation on the console (trainer.progress=false hides only mmengine's lines) and in
    # train.log, from the record it wrote: the trained epochs of this run (the resumed one's are in train.log too)
    printed = {int(m.group(1)): m.groups() for m in EPOCH_LINE.finditer(done.stdout)}
    resumed_at = int(re.findall(r"\d+", last)[0])
    assert sorted(printed) == list(range(resumed_at + 1, EPOCHS + 1)), done.stdout[-3000:]
    for row in rows:
        if row["epoch"] in printed:
            assert printed[row["epoch"]][1:6] == (f"{row['train_loss']:.4f}", f"{row['coco/bbox_mAP']:.3f}",
                                                  f"{row['coco/segm_mAP']:.3f}", f"{row['lr']:.2e}",
                                                  f"{row['sparsity/density']:.3f}")
    log = (run_dir / "train.log").read_text()
    assert all(f"] epoch {e}/3: loss" in log for e in printed), log[-3000:]
    match = DONE.search(done.stdout)
    assert match, done.stdout[-2000:]
    bbox, segm, density, exact = (float(v) for v in match.groups()[:4])
    assert bbox == pytest.approx(rows[-1]["coco/bbox_mAP"], abs=5e-4) and exact == 1.0 and density < 1.0
    assert Path(match.group(5)) == run_dir
    assert list(run_dir.glob("*/vis_data/events.out.tfevents.*")), "no TensorBoard events"
    assert list(run_dir.glob("*/*.log")), "no mmengine log"

    # 3. the finished run, once more: nothing is trained again, the same final line
    again = subprocess.run(command(tmp_path), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert checkpoints(run_dir) == after and len(metrics(run_dir)) == len(rows)
    rerun = DONE.search(again.stdout)
    assert rerun and rerun.group(1) == match.group(1) and rerun.group(2) == match.group(2), again.stdout[-2000:]

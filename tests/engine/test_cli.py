"""tools/train.py as users run it: one-line errors with exit status 2, multirun, and 2-process torchrun (gloo)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.helpers import PYTHON, ROOT, TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(ROOT / "tools" / "train.py"), *args],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.name=nope"], "model.name"),
        (["optim.lr=-1"], "optim.lr"),
        (["data=imagenet", "data.root=/nonexistent"], "/nonexistent"),
        (["data=imagenet"], "data.root"),
        (["sparsity=lbc", "sparsity.pattern=4:4"], "sparsity.pattern"),
        (["schedule.warmup_epochs=30", "schedule.epochs=30"], "schedule.warmup_epochs"),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path, overrides, key):
    proc = train(*overrides, f"run_dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_cli_run_and_multirun(tmp_path):
    proc = train(*TINY, "schedule.epochs=1", f"run_dir={tmp_path / 'single'}")
    assert proc.returncode == 0, proc.stderr
    assert "done: top-1" in proc.stdout and str(tmp_path / "single") in proc.stdout
    assert (tmp_path / "single" / "config.yaml").is_file()

    proc = train("-m", *TINY, "schedule.epochs=1", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        run_dir = tmp_path / "sweep" / job
        assert (run_dir / "last.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
        assert f"seed: {job}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_end_identical(tmp_path):
    run_dir = tmp_path / "ddp"
    # LBC with t_f=1 freezes its scores during training: the DDP wrapper must be rebuilt.
    args = [*TINY, "sparsity=lbc", "sparsity.t_f=1", "trainer.dump_params=true", f"run_dir={run_dir}"]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(run_dir / "rank0_params.pt")
    b = torch.load(run_dir / "rank1_params.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # rank 0 alone writes
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert proc.stdout.count("done: top-1") == 1
    assert "rebuilt the wrapper" in proc.stdout


@pytest.mark.slow
def test_diverged_run_stops_with_one_line_and_no_checkpoint(tmp_path):
    proc = train(*TINY, "sparsity=dense", "optim.lr=1e30", f"run_dir={tmp_path / 'nan'}", timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss is nan at epoch 1"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nan" / "last.pt").exists()  # nothing diverged was saved

"""``lbc-train`` as users run it: one-line errors with exit status 2, train.log, multirun, 2-process torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import PYTHON, ROOT, TINY, run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def lbc_train(*args: str, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("lbc-train")
    return subprocess.run([str(script), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.name=nope"], "model.name"),  # our builder
        (["model=nope"], "model=nope"),  # Hydra: no such group option
        (["optim.lr=-1"], "optim.lr"),  # range check next to the field
        (["optim.lr=abc"], "optim.lr"),  # OmegaConf: wrong type
        (["sparsity.comon=1"], "sparsity.comon"),  # OmegaConf: unknown key
        (["+sparsity.common=1"], "sparsity.common"),  # an added unknown key
        (["trainer.compile=maybe"], "trainer.compile"),
        (["data=imagenet", "data.root=/nonexistent"], "/nonexistent"),  # the data builder
        (["data=imagenet"], "data.root"),  # a required key
        (["sparsity=lbc", "sparsity.pattern=4:4"], "sparsity.pattern"),
        (["schedule.warmup_epochs=30", "schedule.epochs=30"], "schedule.warmup_epochs"),
        (["sparsity=asp", "sparsity.dense_epochs=1", "sparsity.finetune_epochs=3", *TINY], "schedule.epochs"),
        (["trainer.init_from=/nonexistent.pt", *TINY], "trainer.init_from"),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path, overrides, key):
    code, out, err = run_cli(*overrides, f"run_dir={tmp_path / 'run'}")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run" / "last.pt").exists()


def test_console_script_exit_status_and_one_line(tmp_path):
    proc = lbc_train("sparsity.comon=1", f"run_dir={tmp_path / 'run'}", timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "sparsity.comon" in proc.stderr


def test_diverged_run_stops_with_one_line_and_no_checkpoint(tmp_path):
    code, _, err = run_cli(*TINY, "sparsity=dense", "optim.lr=1e30", f"run_dir={tmp_path / 'nan'}")
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loss is nan at epoch 1"), err
    assert not (tmp_path / "nan" / "last.pt").exists()  # nothing diverged was saved


@pytest.mark.slow
def test_cli_run_train_log_and_multirun(tmp_path):
    # from another directory: the configs ship inside the package
    proc = lbc_train(*TINY, "schedule.epochs=1", f"run_dir={tmp_path / 'single'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "done: top-1" in proc.stdout and "run dir: single" in proc.stdout  # relative to where it ran
    assert (tmp_path / "single" / "config.yaml").is_file()
    log = (tmp_path / "single" / "train.log").read_text()  # Hydra's log file holds our messages
    assert "epoch 1/1: loss" in log and "done: top-1" in log and "lbc: resnet_small on digits" in log

    proc = lbc_train("-m", *TINY, "schedule.epochs=1", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    for job in ("0", "1"):
        run_dir = tmp_path / "sweep" / job
        assert (run_dir / "last.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
        assert f"seed: {job}" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_torchrun_two_processes_end_identical(tmp_path):
    run_dir = tmp_path / "ddp"
    # LBC with t_f=1 freezes its scores during training. Scores and masks stay outside DDP (no rebuild):
    # the method averages the score gradients itself, so ranks that did not would differ here.
    args = [*TINY, "sparsity=lbc", "sparsity.t_f=1", f"run_dir={run_dir}"]
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/cli/ddp_job.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(run_dir / "rank0_params.pt")
    b = torch.load(run_dir / "rank1_params.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()  # rank 0 alone writes
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    scores = [k for k in a if k.endswith(".scores")]
    assert scores and all(a[k].unique().numel() > 1 for k in scores)  # learned during epoch 1, equal on both ranks


@pytest.mark.slow
def test_a_users_config_dir_adds_options(tmp_path):
    """``--config-dir`` adds a model option beside ours; it extends the generic timm schema."""
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "tiny_vit.yaml").write_text(
        "defaults:\n  - base_timm\n  - _self_\nname: deit_tiny_patch16_224\n")
    proc = lbc_train("--config-dir", str(tmp_path / "mine"), "model=tiny_vit", "+model.extra.depth=2", "--cfg", "job",
                     cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: deit_tiny_patch16_224" in proc.stdout and "depth: 2" in proc.stdout
    proc = lbc_train("--config-dir", str(tmp_path / "mine"), "model=tiny_vit", "model.depth=2", cwd=tmp_path,
                     timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: model.depth is not a known key; allowed: extra, name, source"


def test_sigterm_during_start_up_is_one_line_exit_143_and_no_folder(tmp_path, monkeypatch):
    """Before the loop's own handler (GracefulStop) is in place, SIGTERM still ends in our one line."""
    import os
    import signal

    import lbc.engine.trainer as trainer

    def build_then_killed(cfg):
        os.kill(os.getpid(), signal.SIGTERM)  # as SLURM would, while the run is being built
        raise AssertionError("SIGTERM did not interrupt the start-up")

    monkeypatch.setattr(trainer, "run", build_then_killed)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli(*TINY, f"run_dir={tmp_path / 'run'}")
    assert code == 143, err
    assert err.strip() == "error: stopped by SIGTERM before training started; nothing was written (run the same command again)"
    assert not (tmp_path / "run").exists() and signal.getsignal(signal.SIGTERM) is before  # handler given back

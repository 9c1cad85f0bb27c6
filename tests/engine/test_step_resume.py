"""Checkpoints inside an epoch: a crash or a stop at any step loses at most the steps since the last
``trainer.checkpoint_every`` write (a stop: none), and the resume ends bit-exact with the uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import lbc.engine.trainer as trainer
from lbc.engine import checkpoint
from lbc.run.signals import Stopped
from tests.helpers import PYTHON, ROOT, TINY, assert_same_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# 3 epochs of 7 steps: enough steps for a write inside an epoch and for LBC's step-wise removal.
STEPS = ["trainer.max_steps_per_epoch=7", "schedule.epochs=3"]
LBC_STEP = ["sparsity=lbc", "sparsity.t_f=2", "sparsity.update_every=step", "trainer.ema=true"]


class Crash(RuntimeError):
    pass


def interrupt_at(monkeypatch, epoch: int, step: int, action) -> None:
    """Run ``action()`` right after optimizer step ``step`` (1-based) of ``epoch`` (0-based), after that
    step's checkpoint decision: a crash raises, a signal asks for a stop."""
    real, wanted = trainer.train_one_epoch, epoch

    def wrapped(*args, epoch: int, after_step, **kwargs):
        def hook(state):
            after_step(state)
            if epoch == wanted and state.step == step:
                action()

        return real(*args, epoch=epoch, after_step=hook, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", wrapped)


def records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "method"), [
    (0, ["sparsity=dense"]),
    (2, ["sparsity=srste", "data.train_augment=true"]),  # random affine per image: the workers draw it
    (0, [*LBC_STEP, "sparsity.removal=paper"]),
    (0, [*LBC_STEP, "sparsity.removal=released"]),
])
def test_a_crash_inside_an_epoch_resumes_from_the_last_step_checkpoint_bit_exact(make_config, tmp_path, monkeypatch,
                                                                                 workers, method):
    over = [*STEPS, *method, f"data.loader.workers={workers}", "trainer.checkpoint_every=3"]
    trainer.run(make_config(*over, run_dir=tmp_path / "straight"))
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")

    def crash():
        raise Crash("simulated crash")

    # every 3 steps of the run: global step 12 = epoch 2 step 5 is written, step 6 is lost
    interrupt_at(monkeypatch, epoch=1, step=6, action=crash)
    with pytest.raises(Crash):
        trainer.run(make_config(*over, run_dir=tmp_path / "crashed"))
    written = checkpoint.load(tmp_path / "crashed" / "last.pt")
    assert (written["epoch"], written["epoch_step"]) == (1, 5)
    monkeypatch.undo()
    trainer.run(make_config(*over, run_dir=tmp_path / "crashed"))
    assert_same_state(straight, checkpoint.load(tmp_path / "crashed" / "last.pt"))
    assert records(tmp_path / "crashed") == records(tmp_path / "straight")  # train loss of the split epoch too


SIGNAL_RUN = [*STEPS, *LBC_STEP, "trainer.checkpoint_every=null"]


@pytest.fixture(scope="module")
def straight_signal_run(tmp_path_factory):
    """The uninterrupted run the signal tests compare with (one for all three signals)."""
    from tests.helpers import compose_config

    run_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer.run(compose_config([*TINY, f"run_dir={run_dir}", *SIGNAL_RUN]))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_saves_at_the_current_step_and_the_resume_is_bit_exact(make_config, tmp_path, monkeypatch, name,
                                                                        straight_signal_run):
    over = SIGNAL_RUN
    signum = getattr(signal, name)
    interrupt_at(monkeypatch, epoch=1, step=4, action=lambda: os.kill(os.getpid(), signum))
    with pytest.raises(Stopped) as stop:
        trainer.run(make_config(*over, run_dir=tmp_path / "stopped"))
    assert stop.value.exit_code == 128 + signum
    assert str(stop.value).startswith(f"stopped by {name} at epoch 2 step 4; checkpoint written to ")
    written = checkpoint.load(tmp_path / "stopped" / "last.pt")
    assert (written["epoch"], written["epoch_step"]) == (1, 4)  # nothing of the epoch dropped
    monkeypatch.undo()
    trainer.run(make_config(*over, run_dir=tmp_path / "stopped"))
    assert_same_state(checkpoint.load(straight_signal_run / "last.pt"), checkpoint.load(tmp_path / "stopped" / "last.pt"))
    assert records(tmp_path / "stopped") == records(straight_signal_run)


def test_checkpoint_every_minutes_writes_inside_the_epoch(make_config, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 40))  # every reading 40 s later: "1min" is due every other step
    monkeypatch.setattr(trainer.time, "monotonic", lambda: float(next(clock)))
    writes = []
    real = trainer.checkpoint.save
    monkeypatch.setattr(trainer.checkpoint, "save", lambda state, path: (writes.append(
        (state["epoch"], state["epoch_step"])), real(state, path))[1])
    trainer.run(make_config("trainer.max_steps_per_epoch=5", "schedule.epochs=1", "trainer.checkpoint_every=1min"))
    inside = [w for w in writes if w[1] > 0]
    assert inside and all(0 < step < 5 for _, step in inside) and len(inside) >= 2
    assert writes[-1] == (1, 0)


@pytest.mark.parametrize("value", [0, -3, "10", "min", "0min", "10 hours", True, 1.5])
def test_checkpoint_every_refuses_what_it_cannot_mean(make_config, value):
    from lbc import config as lbc_config
    from lbc.errors import ConfigError

    cfg = make_config()
    cfg.trainer.checkpoint_every = value
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_every=.* is not allowed; use a number of steps"):
        lbc_config.validate(cfg)


@pytest.mark.parametrize(("value", "cadence"), [(200, (200, None)), ("10min", (None, 10.0)), ("0.5 min", (None, 0.5)),
                                                (None, (None, None))])
def test_checkpoint_every_reads_steps_or_minutes(value, cadence):
    from lbc.run.cadence import checkpoint_cadence

    assert checkpoint_cadence(value) == cadence


def test_a_loader_begun_at_batch_k_gives_the_uninterrupted_batches(make_config):
    from lbc.data import build_datasets, build_loader

    cfg = make_config("data.train_augment=true")  # a random affine per image
    data = build_datasets(**{k: v for k, v in cfg.data.items() if k not in ("loader", "augment")})
    batches = {}
    for workers in (0, 2):
        loader = build_loader(data.train, batch_size=16, train=True, workers=workers, seed=1)
        loader.set_epoch(3)
        whole = [x for x, _ in loader]
        loader.set_epoch(3, start=5)
        tail = [x for x, _ in loader]
        assert len(tail) == len(whole) - 5 and all(torch.equal(a, b) for a, b in zip(whole[5:], tail, strict=True))
        batches[workers] = whole
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))  # workers change nothing


# --- two gloo processes under torchrun, one rank signalled ----------------------------------------------

def torchrun(run_dir, *args: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, "MASTER_PORT": str(free_port())}
    if signal_at:
        env["DDP_JOB_SIGNAL"] = signal_at
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/cli/ddp_job.py",
           *TINY, *args, f"run_dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_one_rank_signalled_or_killed_resume_bit_exact(tmp_path):
    """SIGTERM to rank 1 alone: both ranks stop after the same step (they agree every 8 steps) and
    write last.pt there; SIGKILL of rank 1: last.pt of the last checkpoint_every write survives. Both
    resumes end with the uninterrupted run's state on both ranks."""
    args = ["trainer.max_steps_per_epoch=20", "sparsity=lbc", "sparsity.t_f=1", "sparsity.update_every=step",
            "trainer.checkpoint_every=6"]
    assert torchrun(tmp_path / "straight", *args).returncode == 0
    straight = checkpoint.load(tmp_path / "straight" / "last.pt")

    term = torchrun(tmp_path / "term", *args, signal_at="1:3:1:SIGTERM")
    assert term.returncode != 0 and "stopped by SIGTERM at epoch 2 step 8; checkpoint written to" in term.stdout
    assert (lambda c: (c["epoch"], c["epoch_step"]))(checkpoint.load(tmp_path / "term" / "last.pt")) == (1, 8)

    kill = torchrun(tmp_path / "kill", *args, signal_at="1:5:1:SIGKILL")
    assert kill.returncode != 0
    assert (lambda c: (c["epoch"], c["epoch_step"]))(checkpoint.load(tmp_path / "kill" / "last.pt")) == (1, 4)

    for name in ("term", "kill"):
        again = torchrun(tmp_path / name, *args)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert "resuming from" in again.stdout and "step" in again.stdout.split("resuming from", 1)[1].split("\n")[0]
        assert_same_state(straight, checkpoint.load(tmp_path / name / "last.pt"))
        ranks = [torch.load(tmp_path / name / f"rank{r}_params.pt") for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_sigusr1_in_a_slurm_job_saves_and_requeues_it(make_config, tmp_path, monkeypatch):
    """SLURM's --signal=USR1@<s>: last.pt at the current step, then ``scontrol requeue <job>`` (a fake
    scontrol on PATH records its arguments), and the stop line says the job was requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    interrupt_at(monkeypatch, epoch=0, step=2, action=lambda: os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(Stopped) as stop:
        trainer.run(make_config("trainer.max_steps_per_epoch=5"))
    assert stop.value.exit_code == 138
    assert str(stop.value).endswith("; SLURM job 4242 requeued: it resumes when it starts again")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert (saved["epoch"], saved["epoch_step"]) == (0, 2)


def test_sigterm_in_a_slurm_job_does_not_requeue(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol needed: it must not be asked
    interrupt_at(monkeypatch, epoch=0, step=1, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Stopped) as stop:
        trainer.run(make_config("trainer.max_steps_per_epoch=5"))
    assert stop.value.exit_code == 143 and "requeued" not in str(stop.value)


KILL_IN_SECOND_SAVE = """
import os, signal, sys, torch
import lbc.engine.checkpoint as checkpoint
from lbc.cli import train
calls = []
real = torch.save
def save(state, f, *a, **k):
    calls.append(1)
    if len(calls) == 2:  # half of the second step checkpoint, then killed mid-write
        open(f, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(state, f, *a, **k)
checkpoint.torch.save = save
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_kill_while_a_step_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    args = [*TINY, "schedule.epochs=1", "trainer.max_steps_per_epoch=7", "trainer.checkpoint_every=2"]
    lbc_train = [PYTHON, "-m", "lbc.cli.train", *args]
    assert subprocess.run([*lbc_train, f"run_dir={tmp_path / 'straight'}"], env=ENV, capture_output=True).returncode == 0
    killed = subprocess.run([PYTHON, "-c", KILL_IN_SECOND_SAVE, *args, f"run_dir={tmp_path / 'run'}"], env=ENV,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "run").glob(".last.pt.*.tmp")]  # the torn write is a temp file
    first = checkpoint.load(tmp_path / "run" / "last.pt")
    assert (first["epoch"], first["epoch_step"]) == (0, 2)  # the previous write, whole
    again = subprocess.run([*lbc_train, f"run_dir={tmp_path / 'run'}"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed" in again.stdout + again.stderr and not list((tmp_path / "run").glob(".*.tmp"))
    assert_same_state(checkpoint.load(tmp_path / "straight" / "last.pt"), checkpoint.load(tmp_path / "run" / "last.pt"))


@pytest.mark.slow
def test_sigusr1_to_lbc_torchrun_reaches_the_ranks_which_save_at_a_step(tmp_path):
    """SLURM signals the launcher: lbc-torchrun passes SIGUSR1 on, both ranks stop after the same step and
    write last.pt there; exit 138 with the run's stop line, and the same command resumes at that step."""
    run_dir = tmp_path / "run"
    cmd = [str(Path(PYTHON).with_name("lbc-torchrun")), "--nproc_per_node=2", *TINY, "trainer.max_steps_per_epoch=40",
           "schedule.epochs=3", "trainer.checkpoint_every=null", f"run_dir={run_dir}"]
    env = {**ENV, "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)  # until epoch 1 is done: both ranks are training, under their stop handlers
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 138, err[-3000:]
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(r"(?:error: )?stopped by SIGUSR1 at epoch (\d+) step (\d+); checkpoint written to \S+ .*", line)
    assert m, line
    saved = checkpoint.load(run_dir / "last.pt")
    epoch, step = int(m[1]), int(m[2])
    assert epoch >= 2 and (saved["epoch"], saved["epoch_step"]) == ((epoch - 1, step) if step < 40 else (epoch, 0))
    assert step % 8 == 0  # the ranks agree on a stop every 8 steps: both stopped there


def test_the_stop_line_names_the_run_dir_when_the_command_did_not():
    from lbc.run.signals import stop_message

    kw = dict(epoch=2, step=5, written=True, checkpoint="outputs/2026-12-01_10-00-00/last.pt")
    assert stop_message("SIGTERM", **kw).endswith("(resume: run the same command again)")
    assert stop_message("SIGTERM", **kw, run_dir_given=False).endswith(
        "(resume: run the same command with run_dir=outputs/2026-12-01_10-00-00)")

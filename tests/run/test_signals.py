"""SIGTERM and Ctrl-C stop a run cleanly: a flag, a stop after the current optimizer step, one line,
exit 143/130, a checkpoint that resumes bit for bit; a second signal ends the process at once.

Tests marked ``INTEGRATION`` in their docstring run the trainer (``lbc.engine.trainer.run``, or the
``lbc-train`` console script in a subprocess) and need the run's ``signals.GracefulStop`` in
``trainer.fit`` and the ``signals.Stopped`` handler in ``lbc/cli/train.py``; the others test
``lbc.run.signals`` itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lbc.engine.trainer as trainer
from lbc.engine import checkpoint
from lbc.run import rundir, signals
from lbc.run.signals import GracefulStop, Stopped, UntilStopped, stop_message
from tests.helpers import PYTHON, ROOT, TINY, assert_same_state, compose_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
LBC_TRAIN = str(Path(sys.executable).with_name("lbc-train"))

WAIT_FOR_SIGNALS = """
import time
from lbc.run.signals import GracefulStop
with GracefulStop() as stop:
    print("ready", flush=True)
    while stop.requested is None:
        time.sleep(0.01)
    print(stop.requested, stop.exit_code, flush=True)
    time.sleep(120)
"""


# --- GracefulStop itself ---------------------------------------------------------------------------


def test_handlers_only_set_a_flag_and_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with GracefulStop() as stop:
        assert stop.requested is None and stop.exit_code == 0 and not stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
        time.sleep(0.01)
        assert stop.requested == "SIGINT" and stop.exit_code == 130 and stop.agreed()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_asks_second_signal_ends_the_process_at_once(sig, code):
    proc = subprocess.Popen([PYTHON, "-c", WAIT_FOR_SIGNALS], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        assert proc.stdout.readline().split() == [sig.name, str(code)]
        assert proc.poll() is None  # the first signal did not end it
        proc.send_signal(sig)
        proc.wait(timeout=10)  # the script would sleep 120 s more
        assert proc.returncode == -sig  # ended by the signal itself (the shell shows 128 + signum)
        assert f"{sig.name} again: exiting now" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


class Loader:
    """A stand-in for the training loader: a list of batches with the attributes train_one_epoch reads."""

    def __init__(self, n: int) -> None:
        self.items, self.skipped = list(range(n)), 0

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def test_until_stopped_ends_the_epoch_after_the_current_step():
    stop = GracefulStop()
    batches = stop.batches(Loader(5))
    assert isinstance(batches, UntilStopped) and len(batches) == 5 and batches.skipped == 0
    assert list(batches) == [0, 1, 2, 3, 4] and batches.taken == 5
    seen = []
    for b in batches:
        seen.append(b)  # "the optimizer step" of batch b
        if b == 1:
            stop.request(signal.SIGTERM)
    assert seen == [0, 1] and batches.taken == 2
    assert list(batches) == [] and batches.taken == 0  # asked before the first batch of the next epoch


def test_stop_message():
    assert stop_message("SIGTERM", epoch=3, step=22, written=True, checkpoint="out/x/last.pt", checkpoint_epoch=3) == (
        "stopped by SIGTERM at epoch 3 step 22; checkpoint written to out/x/last.pt (resume: run the same command again)")
    assert stop_message("SIGINT", epoch=3, step=7, written=False, checkpoint="out/x/last.pt", checkpoint_epoch=2) == (
        "stopped by SIGINT at epoch 3 step 7; the partial epoch is dropped; resume continues from epoch 3 with "
        "out/x/last.pt (run the same command again)")
    assert stop_message("SIGTERM", epoch=1, step=5, written=False, checkpoint=None) == (
        "stopped by SIGTERM at epoch 1 step 5; the partial epoch is dropped and no checkpoint was written "
        "(the same command starts the run over)")
    # With trainer.resume=old.pt the same command would read old.pt again, not the newer last.pt.
    assert stop_message("SIGTERM", epoch=4, step=22, written=True, checkpoint="out/x/last.pt", checkpoint_epoch=4,
                        explicit_resume="old.pt").endswith("(resume: run the same command with trainer.resume=out/x/last.pt)")


# --- a stopped run resumes bit for bit (INTEGRATION) ----------------------------------------------------

# Three epochs of three steps; last.pt only every second epoch (and at the end), so that a stop can
# fall after an epoch that was not saved.
OVERRIDES = [*TINY, "schedule.epochs=3", "trainer.ckpt_interval=2"]


def config(run_dir: Path, *more: str):
    return compose_config([*OVERRIDES, f"run_dir={run_dir}", *more])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its last.pt and metrics."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = trainer.run(config(run_dir))
    return checkpoint.load(run_dir / "last.pt"), result


class SignalAt:
    """The epoch's batches; sends ``sig`` to this process as batch ``at`` is handed out (before its step)."""

    def __init__(self, loader, at: int, sig: int) -> None:
        self.loader, self.at, self.sig = loader, at, sig

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                os.kill(os.getpid(), self.sig)
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def signal_in_epoch(monkeypatch, in_epoch: int, at: int | None, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` in epoch ``in_epoch`` (0-based) as batch ``at`` is fetched (None: before the epoch's first step)."""
    real = trainer.train_one_epoch

    def train_one_epoch(replica, loader, *args, epoch: int, **kwargs):
        if epoch == in_epoch:
            if at is None:
                os.kill(os.getpid(), sig)
            else:
                loader = SignalAt(loader, at, sig)
        return real(replica, loader, *args, epoch=epoch, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", train_one_epoch)


class UnhandledSignal(Exception):
    pass


@pytest.fixture(autouse=True)
def safety_net():
    """While a test runs, SIGTERM/SIGINT that nothing else handles fail the test instead of ending pytest
    (the trainer's GracefulStop installs its own handlers over these, and restores them)."""

    def unhandled(signum, frame):
        raise UnhandledSignal(f"{signal.Signals(signum).name} was not handled by the trainer")

    before = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def epochs_in(run_dir: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_that_step_and_resume_is_bit_exact(tmp_path, monkeypatch, straight, caplog):
    """INTEGRATION: SIGTERM during epoch 3: last.pt is written at its step 2, nothing trained is dropped."""
    run_dir = tmp_path / "run"
    signal_in_epoch(monkeypatch, in_epoch=2, at=1)
    with caplog.at_level("INFO", logger="lbc"), pytest.raises(Stopped) as stopped:
        trainer.run(config(run_dir))
    assert stopped.value.exit_code == 143 and stopped.value.signal_name == "SIGTERM"
    line = f"stopped by SIGTERM at epoch 3 step 2; checkpoint written to {run_dir / 'last.pt'} (resume: run the same command again)"
    assert str(stopped.value) == line
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopped")] == [line]
    saved = checkpoint.load(run_dir / "last.pt")
    assert (saved["epoch"], saved["epoch_step"]) == (2, 2) and epochs_in(run_dir) == [1, 2]
    rundir.acquire(run_dir).release()  # the stopped run gave the directory back

    monkeypatch.undo()
    result = trainer.run(config(run_dir))  # "run the same command again"
    assert_same_state(straight[0], checkpoint.load(run_dir / "last.pt"))
    assert result["top1"] == straight[1]["top1"] and epochs_in(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_after_an_epochs_last_step_saves_that_epoch(tmp_path, monkeypatch, straight):
    """INTEGRATION: a stop that arrives during evaluation writes the whole epoch (ckpt_interval=2 would not)."""
    run_dir = tmp_path / "run"
    real, calls = trainer.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    with pytest.raises(Stopped) as stopped:
        trainer.run(config(run_dir))
    assert str(stopped.value) == (f"stopped by SIGTERM at epoch 1 step 3; checkpoint written to {run_dir / 'last.pt'} "
                                  "(resume: run the same command again)")
    assert checkpoint.load(run_dir / "last.pt")["epoch"] == 1 and epochs_in(run_dir) == [1]

    monkeypatch.undo()
    trainer.run(config(run_dir))
    assert_same_state(straight[0], checkpoint.load(run_dir / "last.pt"))
    assert epochs_in(run_dir) == [1, 2, 3]


def test_sigint_before_the_first_step_exits_130_and_writes_nothing(tmp_path, monkeypatch):
    """INTEGRATION: a first Ctrl-C stops the run; nothing to save yet, and the line says so."""
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    signal_in_epoch(monkeypatch, in_epoch=0, at=None, sig=signal.SIGINT)
    with pytest.raises(Stopped) as stopped:
        trainer.run(config(run_dir))
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == ("stopped by SIGINT at epoch 1 step 0; the partial epoch is dropped and no "
                                  "checkpoint was written (the same command starts the run over)")
    assert not (run_dir / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    rundir.acquire(run_dir).release()


# --- lbc-train in a subprocess (INTEGRATION) -------------------------------------------------------------

STOPPED = re.compile(
    r"stopped by (SIG\w+) at epoch (\d+) step (\d+); checkpoint written to (\S+) \(resume: run the same command again\)"
)


def wait_for_metrics(run_dir: Path, proc: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {lines} line(s) in {path} after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, workers, group", [(signal.SIGTERM, 143, 0, False),  # SLURM / Kubernetes
                                                        (signal.SIGINT, 130, 2, True)])  # Ctrl-C: the whole group
def test_lbc_train_stopped_by_a_signal_then_resumed(tmp_path, sig, code, workers, group):
    """INTEGRATION: exit 143 (130), the one line, last.pt; the same command again resumes and finishes."""
    run_dir = tmp_path / "run"
    epochs = 5
    cmd = [LBC_TRAIN, "trainer=smoke", "trainer.max_steps_per_epoch=10", f"schedule.epochs={epochs}",
           "schedule.warmup_epochs=0", "data.loader.batch_size=16", f"data.loader.workers={workers}",
           f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_metrics(run_dir, proc)
        if group:  # what a terminal does on Ctrl-C: the trainer and its DataLoader workers get it
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-3000:]
    lines = [x for x in out.splitlines() + err.splitlines() if x.startswith("stopped by")]
    assert len(lines) == 1, out + err
    m = STOPPED.fullmatch(lines[0])
    assert m and m[1] == sig.name, lines[0]
    epoch, step, written = int(m[2]), int(m[3]), m[4]
    ckpt = checkpoint.load(run_dir / "last.pt")
    saved = ckpt["epoch"]
    assert Path(written).name == "last.pt"
    if step == 10:  # stopped after the epoch's last step: that epoch was saved
        assert saved == epoch and ckpt["epoch_step"] == 0
    else:  # inside the epoch: saved at that step (step 0: the previous epoch's end, which the checkpoint is)
        assert (saved, ckpt["epoch_step"]) == (epoch - 1, step) and 0 <= step < 10
    assert 1 <= saved < epochs and epochs_in(run_dir) == list(range(1, saved + 1))
    assert lines[0] in (run_dir / "train.log").read_text()
    assert "Traceback" not in err

    again = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    at = f"epoch {saved}" if ckpt["epoch_step"] == 0 else f"epoch {epoch} step {step}"
    assert f"resuming from run/last.pt at {at}" in again.stdout  # run_dir relative to where it ran
    assert "done: top-1" in again.stdout and "stopped by" not in again.stdout
    assert epochs_in(run_dir) == list(range(1, epochs + 1))
    assert checkpoint.load(run_dir / "last.pt")["epoch"] == epochs


def test_exit_process_outside_torchrun_is_sys_exit():
    with pytest.raises(SystemExit) as e:
        signals.exit_process(143)
    assert e.value.code == 143

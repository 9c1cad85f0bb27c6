"""One run per run directory (an flock held by a live process; none left by a killed one) and the
run_dir values a run refuses, with real processes and real directories.

Tests marked ``INTEGRATION`` in their docstring go through ``lbc.engine.trainer.run`` or the
``lbc-train`` console script and need ``Run.claim`` (``lbc.run.lifecycle``) in ``trainer.build`` and the
``rundir.check_argv`` / ``rundir.remove_if_unused`` calls in ``lbc/cli/train.py``; the others test
``lbc.run.rundir`` itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lbc.engine.trainer as trainer
from lbc.errors import ConfigError
from lbc.run import rundir
from tests.helpers import PYTHON, ROOT, TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
LBC_TRAIN = str(Path(sys.executable).with_name("lbc-train"))

HOLD = """
import sys, time
from lbc.run import rundir
lock = rundir.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """``holder(run_dir)``: a live python process that took the lock on ``run_dir`` and sleeps."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([PYTHON, "-c", HOLD, str(run_dir)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()  # blocks until the lock is held (or the process died)
        assert line.strip() == "held", proc.stderr.read()
        assert proc.poll() is None
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def one_line(err: ConfigError | str) -> str:
    text = str(err)
    assert "\n" not in text.strip(), text
    return text


def lbc_train(*args: str, cwd: Path, prefix: list[str] | None = None, timeout: int = 300):
    return subprocess.run([*(prefix or []), LBC_TRAIN, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# --- the lock ------------------------------------------------------------------------------------


def test_a_live_holder_is_named_and_a_killed_one_leaves_no_lock(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(ConfigError) as err:
        rundir.acquire(run_dir)
    message = one_line(err.value)
    assert message.startswith(f"run_dir={run_dir} is in use by pid {proc.pid} on host ")
    assert "(started " in message and message.endswith("wait for it, or pick another run_dir")
    assert json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid

    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: the kernel drops the lock
    proc.wait(timeout=30)
    with rundir.acquire(run_dir) as lock:
        assert lock.held and json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert not lock.held and (run_dir / ".lock").read_text() == ""


def test_acquire_creates_the_directory_and_one_process_cannot_hold_it_twice(tmp_path):
    run_dir = tmp_path / "a" / "b"
    lock = rundir.acquire(run_dir)
    assert run_dir.is_dir() and lock.held
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} "):
        rundir.acquire(run_dir)
    lock.release()
    lock.release()  # twice: a no-op
    rundir.acquire(run_dir).release()


def _sleep_forever(conn) -> None:
    conn.send("forked")
    time.sleep(120)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked while the trainer holds the lock: they must not hold it too."""
    run_dir = tmp_path / "run"
    lock = rundir.acquire(run_dir)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=_sleep_forever, args=(child,), daemon=True)
    worker.start()
    try:
        assert parent.recv() == "forked" and worker.is_alive()
        lock.release()
        rundir.acquire(run_dir).release()  # the live child's inherited descriptor was closed at fork
    finally:
        worker.kill()
        worker.join(30)


# --- run_dir values a run refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", "run_dir='' would put the run's files into the current directory"),
        (".", "run_dir='.' would put the run's files into the current directory"),
        ("{cwd}", "is the current directory"),
        ("{cwd}/..", "is above the current directory"),
        ("/", "is the file system root"),
        ("/proc/lbc_run", "is under /proc"),
        ("/sys/lbc_run", "is under /sys"),
        ("/dev/lbc_run", "is under /dev"),
        ("{cwd}/a_file", "is an existing file"),
        ("{cwd}/a_file/run", "cannot be created: {cwd}/a_file is a file"),
    ],
)
def test_check_usable_refuses(tmp_path, monkeypatch, value, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    value, expected = value.format(cwd=tmp_path), expected.format(cwd=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError) as err:
        rundir.check_usable(value)
    message = one_line(err.value)
    assert message.startswith("run_dir=") and expected in message, message
    assert value in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # created nothing


def test_check_usable_accepts_new_and_existing_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rundir.check_usable("outputs/new/run") == Path("outputs/new/run")
    assert not (tmp_path / "outputs").exists()  # checking creates nothing
    (tmp_path / "old").mkdir()
    assert rundir.check_usable(tmp_path / "old") == tmp_path / "old"


def without_permission_override() -> list[str] | None:
    """A command prefix under which the permission bits apply (root ignores them), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    drop = "-dac_override,-dac_read_search"
    probe = subprocess.run([setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "true"], capture_output=True)
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"] if probe.returncode == 0 else None


@pytest.fixture
def read_only_dir(tmp_path):
    prefix = without_permission_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to apply")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    yield ro, prefix
    ro.chmod(0o755)


@pytest.mark.parametrize("sub, expected", [("", "is not writable"), ("run", "cannot be created: {ro} is not writable")])
def test_check_usable_refuses_a_directory_without_write_permission(read_only_dir, sub, expected):
    ro, prefix = read_only_dir
    target = ro / sub if sub else ro
    code = ("import sys\nfrom lbc.run import rundir\nfrom lbc.errors import ConfigError\n"
            "try:\n    rundir.check_usable(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n    sys.exit(2)\n")
    proc = subprocess.run([*prefix, PYTHON, "-c", code, str(target)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines() == [f"run_dir={target} {expected.format(ro=ro)} "
                                                "(permission denied or a read-only file system); pick another run_dir"]


def test_check_argv_refuses_before_hydra_and_leaves_sweeps_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["run_dir="], ["optim.lr=1", "++run_dir=."], ["hydra.run.dir=/proc/x"]):
        with pytest.raises(ConfigError):
            rundir.check_argv(argv)
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir=/proc/x is under /proc"):
        rundir.check_argv(["hydra.run.dir=/proc/x"])
    for argv in (["run_dir=outputs/x"], ["-m", "run_dir="], ["run_dir=a,b"], ["run_dir=${now:%H}"], ["--cfg", "job",
                                                                                                   "run_dir="]):
        rundir.check_argv(argv)


# --- the folder a failed start leaves ---------------------------------------------------------------


def hydra_leftovers(path: Path) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (path / "train.log").write_text("")
    return path


def test_remove_if_unused_removes_only_what_a_failed_start_left(tmp_path, monkeypatch, holder):
    assert rundir.remove_if_unused(hydra_leftovers(tmp_path / "failed")) and not (tmp_path / "failed").exists()

    kept = hydra_leftovers(tmp_path / "resumed")
    (kept / "last.pt").write_bytes(b"x")
    assert not rundir.remove_if_unused(kept) and (kept / "last.pt").exists()

    starting = hydra_leftovers(tmp_path / "starting")  # a live run holds it, still before its first write
    holder(starting)
    assert not rundir.remove_if_unused(starting) and (starting / ".hydra").is_dir()

    here = hydra_leftovers(tmp_path / "here")
    monkeypatch.chdir(here)
    assert not rundir.remove_if_unused(here) and not rundir.remove_if_unused(".") and here.is_dir()


@pytest.fixture
def fresh_note(monkeypatch):
    """An empty record of the folders before a start (rundir._BEFORE is per process)."""
    monkeypatch.setattr(rundir, "_BEFORE", {})


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_a_failed_start_removes_the_parents_made_for_it_and_keeps_older_ones(tmp_path, monkeypatch, fresh_note):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()  # an empty folder from before the run: stays
    rundir.check_argv([f"run_dir={tmp_path / 'kept' / 'a' / 'b' / 'c'}"])  # lbc-train's first step, before Hydra
    run_dir = hydra_leftovers(tmp_path / "kept" / "a" / "b" / "c")  # Hydra makes a/b/c and writes into it
    assert rundir.remove_if_unused(run_dir)
    assert names(tmp_path) == ["kept"] and names(tmp_path / "kept") == []

    rundir.check_argv(["run_dir=rel/x"])  # relative to the current directory, as Hydra takes it
    (tmp_path / "rel" / "other").mkdir(parents=True)  # something else appears there meanwhile: rel stays
    assert rundir.remove_if_unused(hydra_leftovers(tmp_path / "rel" / "x"))
    assert names(tmp_path) == ["kept", "rel"] and names(tmp_path / "rel") == ["other"]


def test_lbc_defaults_outputs_and_multirun_go_when_this_start_made_them(tmp_path, monkeypatch, fresh_note):
    monkeypatch.chdir(tmp_path)
    rundir.check_argv([])  # run_dir: outputs/${now:...}
    assert rundir.remove_if_unused(hydra_leftovers(tmp_path / "outputs" / "2026-12-02_07-50-03"))
    assert names(tmp_path) == []

    (tmp_path / "outputs" / "2026-12-01_10-00-00").mkdir(parents=True)  # an earlier run: outputs stays
    rundir.check_argv(["optim.lr=1"])
    assert rundir.remove_if_unused(hydra_leftovers(tmp_path / "outputs" / "2026-12-02_07-50-03"))
    assert names(tmp_path) == ["outputs"] and names(tmp_path / "outputs") == ["2026-12-01_10-00-00"]

    rundir.check_argv(["-m", "sparsity.pattern=2:4,1:4"])  # a sweep: multirun/${now:...}/<job>
    sweep = tmp_path / "multirun" / "2026-12-02_07-50-03"
    job = hydra_leftovers(sweep / "0")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's record of the sweep; job 0 failed at start-up
    assert rundir.remove_if_unused(job)
    assert names(tmp_path) == ["outputs"]

    rundir.check_argv(["-m", "sparsity.pattern=2:4,1:4"])
    sweep = tmp_path / "multirun" / "2026-12-02_08-00-00"
    (sweep / "0" / "last.pt").parent.mkdir(parents=True)
    (sweep / "0" / "last.pt").write_bytes(b"x")  # job 0 ran; job 1 failed at start-up: the sweep stays
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    assert rundir.remove_if_unused(hydra_leftovers(sweep / "1"))
    assert names(sweep) == ["0", "multirun.yaml"]


def test_parents_nobody_noted_stay(tmp_path, monkeypatch, fresh_note):
    """Without a note from before the start (the Python API, or another process made the run dir), nothing
    above the run dir is known to be this run's: only the run dir goes."""
    monkeypatch.chdir(tmp_path)
    assert rundir.remove_if_unused(hydra_leftovers(tmp_path / "a" / "b" / "run"))
    assert names(tmp_path) == ["a"] and names(tmp_path / "a") == ["b"] and names(tmp_path / "a" / "b") == []
    assert rundir.remove_created_parents(tmp_path / "a" / "b" / "run") == []

    here = tmp_path / "work"  # the current directory, and the folders above it, are never removed
    rundir.check_argv([f"run_dir={here / 'run'}"])
    here.mkdir()
    monkeypatch.chdir(here)
    assert rundir.remove_if_unused(hydra_leftovers(here / "run")) and here.is_dir()


# --- through the trainer and lbc-train (INTEGRATION) -------------------------------------------------


def test_trainer_refuses_a_run_dir_in_use_and_runs_once_it_is_free(make_config, tmp_path, holder):
    """INTEGRATION: trainer.build claims the run directory."""
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(ConfigError) as err:
        trainer.run(make_config("schedule.epochs=1", run_dir=run_dir))
    assert one_line(err.value).startswith(f"run_dir={run_dir} is in use by pid {proc.pid} on host ")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written by the refused run

    proc.kill()
    proc.wait(timeout=30)
    result = trainer.run(make_config("schedule.epochs=1", run_dir=run_dir))
    assert (run_dir / "last.pt").is_file() and result["top1"] is not None
    rundir.acquire(run_dir).release()  # the finished run gave the directory back


@pytest.mark.parametrize("value, expected", [(".", "current directory"), ("a_file", "is an existing file"),
                                             ("/proc/lbc_run", "is under /proc")])
def test_trainer_refuses_unusable_run_dirs(make_config, tmp_path, monkeypatch, value, expected):
    """INTEGRATION: trainer.build checks run_dir (Run.claim)."""
    monkeypatch.chdir(tmp_path)  # run_dir=. must never mean the checkout
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError) as err:
        trainer.run(make_config(run_dir=value))
    assert one_line(err.value).startswith(f"run_dir={value!r}" if value == "." else f"run_dir={value} ")
    assert expected in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_trainer_gives_the_run_dir_back_when_building_fails(make_config, tmp_path):
    """INTEGRATION: a build that fails after the claim releases the lock (in-process reruns work)."""
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="trainer.init_from"):
        trainer.run(make_config("trainer.init_from=/nonexistent.pt", run_dir=run_dir))
    assert (run_dir / ".lock").is_file()  # it was claimed ...
    rundir.acquire(run_dir).release()  # ... and given back


@pytest.mark.slow
def test_lbc_train_refuses_a_run_dir_in_use_and_keeps_it(tmp_path, holder):
    """INTEGRATION: one line, exit 2, and the other run's directory is left as it is."""
    run_dir = hydra_leftovers(tmp_path / "busy")
    proc = holder(run_dir)
    out = lbc_train(*TINY, f"run_dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()  # lbc-train names the run_dir relative to where it runs
    assert len(lines) == 1 and lines[0].startswith(f"error: run_dir=busy is in use by pid {proc.pid} on host "), lines
    assert lines[0].endswith("wait for it, or pick another run_dir") and "Traceback" not in out.stdout
    assert (run_dir / ".hydra").is_dir() and (run_dir / ".lock").is_file()


@pytest.mark.slow
def test_lbc_train_refuses_an_empty_run_dir_before_writing_anything(tmp_path):
    """INTEGRATION: run_dir='' is refused before Hydra writes .hydra/ and train.log into the current directory."""
    for value in ("", "."):
        out = lbc_train(f"run_dir={value}", cwd=tmp_path, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == (f"error: run_dir={value!r} would put the run's files into the current directory "
                                      f"({tmp_path}); use a directory of its own, e.g. run_dir=outputs/my_run")
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_lbc_train_failed_start_leaves_no_empty_folder(tmp_path):
    """INTEGRATION: a config error found after Hydra made the run directory removes that directory."""
    out = lbc_train("optim.lr=-1", f"run_dir={tmp_path / 'new'}", cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: optim.lr=-1.0"), out.stderr
    assert not (tmp_path / "new").exists()
    out = lbc_train(*TINY, "trainer.init_from=/nonexistent.pt", f"run_dir={tmp_path / 'late'}", cwd=tmp_path,
                    timeout=120)  # refused after the claim: the lock file goes too
    assert out.returncode == 2 and "trainer.init_from" in out.stderr, out.stderr
    assert not (tmp_path / "late").exists()

    kept = tmp_path / "resumed"  # a directory with a run in it stays, whatever the error
    kept.mkdir()
    (kept / "metrics.jsonl").write_text("")
    out = lbc_train("optim.lr=-1", f"run_dir={kept}", cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and sorted(p.name for p in kept.iterdir()) == ["metrics.jsonl"]  # nothing written


@pytest.mark.slow
def test_lbc_train_failed_start_leaves_no_empty_parent_it_made(tmp_path):
    """INTEGRATION: the folders Hydra made on the way to run_dir go with it; those from before stay."""
    work = tmp_path / "work"
    (work / "empty_before").mkdir(parents=True)
    out = lbc_train("optim.lr=-1", f"run_dir={tmp_path / 'a' / 'b' / 'c'}", cwd=work, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: optim.lr=-1.0"), out.stderr
    assert names(tmp_path) == ["work"]
    out = lbc_train("optim.lr=-1", f"run_dir={work / 'empty_before' / 'x' / 'y'}", cwd=work, timeout=120)
    assert out.returncode == 2, out.stderr
    assert names(work) == ["empty_before"] and names(work / "empty_before") == []
    out = lbc_train("optim.lr=-1", cwd=work, timeout=120)  # lbc's default: outputs/<date>_<time>
    assert out.returncode == 2, out.stderr
    assert names(work) == ["empty_before"]


def test_lbc_train_refuses_a_run_dir_it_cannot_write(read_only_dir, tmp_path):
    """INTEGRATION: one line and exit 2 (not a PermissionError traceback)."""
    ro, prefix = read_only_dir
    out = lbc_train(f"run_dir={ro / 'run'}", cwd=tmp_path, prefix=prefix, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"error: run_dir={ro / 'run'} cannot be created: {ro} is not writable "
                                  "(permission denied or a read-only file system); pick another run_dir")

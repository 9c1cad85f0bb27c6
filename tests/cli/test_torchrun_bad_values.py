"""``lbc-torchrun``'s bad values and lost ranks (issue 20): each ends in exactly one line on stderr.

A bad torchrun option: exit 2, one line, nothing started (in this process, instant). A config error under two
processes: one line, without torchrun's OMP_NUM_THREADS banner. A rank killed (SIGKILL), stopped (SIGTERM) or
frozen (SIGSTOP): one line saying which rank, what happened and how to resume; a frozen rank ends the run
after LBC_DIST_TIMEOUT seconds instead of stalling it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lbc.cli import torchrun
from tests.helpers import TINY

OPTIONS: list[tuple[str, list[str], str]] = [
    # (id, torchrun options, the exact part of the one line)
    ("nproc not a number", ["--nproc_per_node=abc"], "--nproc_per_node=abc: Unsupported nproc_per_node value: abc"),
    ("nproc without value", ["--nproc_per_node"], "argument --nproc-per-node/--nproc_per_node: expected one argument"),
    ("unknown option", ["--bogus=1"], "unrecognized arguments: --bogus=1"),
    ("nnodes not MIN:MAX", ["--nnodes=1:2:3"], '--nnodes=1:2:3: nnodes=1:2:3 is not in "MIN:MAX" format; use N'),
    ("nnodes not a number", ["--nnodes=x"], "--nnodes=x: invalid literal for int() with base 10: 'x'; use N or MIN:MAX"),
    ("nnodes min over max", ["--nnodes=3:2"], "min_nodes must be > 0 and <= max_nodes"),
    ("negative restarts", ["--max-restarts=-1"], "max_restarts must be >= 0"),
]


@pytest.mark.parametrize("options, expected", [c[1:] for c in OPTIONS], ids=[c[0] for c in OPTIONS])
def test_a_bad_option_is_one_line_and_exit_2(monkeypatch, options, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
        torchrun.main([*options, "trainer=smoke"])
    assert done.value.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err.getvalue()
    assert lines[0].endswith("(see torchrun --help)") and out.getvalue() == ""
    assert "LBC_TORCHRUN_REPORTS" not in os.environ


# --- under two processes ----------------------------------------------------------------------------

SCRIPT = Path(sys.executable).with_name("lbc-torchrun")


def launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``lbc-torchrun --standalone --nproc_per_node=2 args`` in the background; stdout to ``tmp_path/out``."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # lbc-torchrun sets it, silently
    return subprocess.Popen([str(SCRIPT), "--standalone", "--nproc_per_node=2", *args], cwd=tmp_path,
                            env={**base, **(env or {})}, stdout=(tmp_path / "out").open("w"),
                            stderr=subprocess.PIPE, text=True)


def ranks(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's children (from their RANK variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def wait_for_epochs(run_dir: Path, proc: subprocess.Popen, count: int = 1, limit: float = 240) -> None:
    """Until ``metrics.jsonl`` has ``count`` records (the run is training, ``last.pt`` written)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count and (run_dir / "last.pt").is_file():
            return
        time.sleep(0.2)
    raise AssertionError("the run did not train")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


LONG = [*TINY, "schedule.epochs=300", "sparsity=dense"]


@pytest.mark.slow
def test_a_config_error_is_one_line_without_the_omp_banner(tmp_path: Path):
    proc = launch(tmp_path, "optim.lr=-1", f"run_dir={tmp_path / 'run'}")
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, err) == (2, "error: optim.lr=-1.0 is not allowed; use a positive number\n"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_bad_timeout_variable_is_one_line(tmp_path: Path):
    proc = launch(tmp_path, *TINY, f"run_dir={tmp_path / 'run'}", env={"LBC_DIST_TIMEOUT": "soon"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err == "error: LBC_DIST_TIMEOUT='soon' is not allowed; use a positive number of seconds (the default is 600)\n"


@pytest.mark.slow
def test_a_killed_rank_is_one_line_naming_it_and_the_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *LONG, f"run_dir={run_dir}")
    wait_for_epochs(run_dir, proc)
    os.kill(ranks(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: rank 1 killed by SIGKILL; the other ranks were stopped; resume: the same "
                               f"command with run_dir={run_dir} continues from {run_dir}/last.pt (epoch "), err


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_with_one_line(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *LONG, f"run_dir={run_dir}")
    wait_for_epochs(run_dir, proc)
    os.kill(ranks(proc.pid)[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM at epoch "), err
    assert "run/last.pt" in lines[0]  # the run dir as given (relative to where it ran)
    saved = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert saved == list(range(1, len(saved) + 1))  # every rank stopped after the same step: one record each


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [1, 0])
def test_a_frozen_rank_ends_the_run_after_the_timeout_with_one_line(tmp_path: Path, frozen: int):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *LONG, f"run_dir={run_dir}", env={"LBC_DIST_TIMEOUT": "4"})
    wait_for_epochs(run_dir, proc)
    pids = ranks(proc.pid)
    other = pids[1 - frozen]
    os.kill(pids[frozen], signal.SIGSTOP)
    start = time.monotonic()
    try:
        while alive(other) and time.monotonic() - start < 60:
            time.sleep(0.1)
        waited = time.monotonic() - start
        assert not alive(other), "the other rank still waits for the frozen one"
        assert waited < 4 + 20, waited  # the timeout, the heartbeat check (a few seconds), start-up slack
    finally:
        os.kill(pids[frozen], signal.SIGKILL)  # else the launcher waits its shutdown timeout (30 s) for it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: rank {frozen} did not answer within 4 s "
                                                   "(LBC_DIST_TIMEOUT): frozen (SIGSTOP), hung or gone; the run "
                                                   "stopped on the other ranks; resume: the same command with "
                                                   f"run_dir="), err
    assert "last.pt (epoch " in lines[0], err

"""The run-dir lock holds whatever the spelling of the directory: relative, ``./``, ``..``, a trailing slash,
a symlink. Two claims of the same directory through two spellings: the second is refused with the one line
naming the holder (the lock is the kernel's ``flock`` on ``<run_dir>/.lock``, the same file for every name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lbc.errors import ConfigError
from lbc.run import rundir
from tests.helpers import TINY, run_cli

REFUSED = r"^run_dir=\S+ is in use by pid {pid} on host \S+ \(started [^)]+\): wait for it, or pick another run_dir$"


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the current directory, holding ``sub/`` and the symlink ``link -> run``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    return tmp_path


def claim(spelling: str | Path) -> rundir.RunDirLock:
    """What Run.claim does on rank 0: the checks, then the lock."""
    return rundir.acquire(rundir.check_usable(spelling))


def second_claim_is_refused(first: str | Path, second: str | Path) -> None:
    lock = claim(first)
    try:
        with pytest.raises(ConfigError) as refused:
            claim(second)
        message = str(refused.value)
        assert "\n" not in message
        assert re.match(REFUSED.format(pid=os.getpid()), message), message
    finally:
        lock.release()
    claim(second).release()  # once given back, the other spelling takes it


def test_relative_and_absolute(here: Path):
    second_claim_is_refused(here / "run", "run")
    second_claim_is_refused("run", here / "run")


def test_dot_slash(here: Path):
    second_claim_is_refused("run", "./run")
    second_claim_is_refused(here / "run", "./run/")


def test_dot_dot(here: Path):
    second_claim_is_refused("run", "sub/../run")


def test_trailing_slash(here: Path):
    second_claim_is_refused("run", "run/")


def test_symlink(here: Path):
    second_claim_is_refused("run", "link")
    second_claim_is_refused("link", here / "run")


def test_symlink_through_lbc_train(here: Path):
    """End to end: a run holds ``run``; lbc-train on ``link`` (the same directory) stops with the one line and
    writes nothing."""
    lock = claim(here / "run")
    try:
        code, _, err = run_cli(*TINY, "run_dir=link")
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: run_dir=") and "is in use by pid" in err
        assert sorted(p.name for p in (here / "run").iterdir()) == [".lock"]
    finally:
        lock.release()

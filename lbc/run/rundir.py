"""The run directory as a resource: is it a usable place (:func:`check_usable`), and one run at a time
in it (:func:`acquire`, an exclusive ``flock`` on ``<run_dir>/.lock``).

Two runs started on the same ``run_dir`` would interleave ``metrics.jsonl`` and one would resume
from the other's ``last.pt`` while it is still being trained. :func:`acquire` refuses the second
one with one :class:`~lbc.errors.ConfigError` line naming the holder (pid, host, start time).

The lock is the kernel's ``flock(LOCK_EX | LOCK_NB)`` on an open file: it is released when the
holder closes it or dies in any way (``kill -9``, OOM killer, a node reboot), so there is never a
stale lock to remove by hand; the ``.lock`` file itself stays in the run directory (deleting it
would open a race between a releasing and two acquiring runs). Forked children (DataLoader
workers) close their inherited descriptor at once, so only the holding process keeps the lock.
Works on local file systems and on NFS (Linux emulates ``flock`` with NFS byte-range locks).

Under ``torchrun`` the ranks first agree on rank 0's ``run_dir`` (:func:`share`); only rank 0 takes the
lock, the other ranks learn its verdict (:func:`claim` does both), so a refused run stops on every rank.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from lbc.errors import ConfigError

LOCK_NAME = ".lock"
# What Hydra writes into its output directory before our code runs, and our lock file: a directory
# holding nothing else has no run in it (see remove_if_unused).
BOOKKEEPING = frozenset({".hydra", "train.log", LOCK_NAME})
SYSTEM_DIRS = ("/proc", "/sys", "/dev")

_HELD: weakref.WeakSet[RunDirLock] = weakref.WeakSet()


def _close_in_child() -> None:
    """After a fork: the child drops its copy of every held lock's descriptor (the parent keeps the lock)."""
    for lock in list(_HELD):
        lock._forget()


os.register_at_fork(after_in_child=_close_in_child)


# --- is this a place for a run? ------------------------------------------------------------------


def check_usable(run_dir: str | os.PathLike[str], key: str = "run_dir") -> Path:
    """``run_dir`` as a Path, if a run may write there; else one ConfigError line (naming ``key``) saying why not.

    Refused: ``''`` and ``'.'``, the current directory itself or one above it (``last.pt``,
    ``metrics.jsonl`` and ``train.log`` would land among the user's files, e.g. in the repository
    root), the file system root, anything under /proc, /sys or /dev, an existing file, and a
    directory that cannot be created or written (permission, read-only file system, a file where a
    parent directory should be). Creates nothing.
    """
    text = os.fspath(run_dir)
    path = Path(text)

    def _refuse(why: str) -> ConfigError:
        return ConfigError(f"{key}={text!r} {why}" if text.strip() in ("", ".") else f"{key}={text} {why}")

    own = "use a directory of its own, e.g. run_dir=outputs/my_run"
    if text.strip() in ("", "."):
        raise _refuse(f"would put the run's files into the current directory ({Path.cwd()}); {own}")
    resolved = Path(os.path.realpath(os.path.abspath(text)))
    cwd = Path(os.path.realpath(Path.cwd()))
    if resolved == Path(resolved.anchor):
        raise _refuse(f"is the file system root; {own}")
    if resolved == cwd:
        raise _refuse(f"is the current directory ({cwd}): the run's files would land among yours; {own}")
    if resolved in cwd.parents:
        raise _refuse(f"is above the current directory ({cwd}): the run's files would land among yours; {own}")
    for system in SYSTEM_DIRS:
        if resolved == Path(system) or Path(system) in resolved.parents:
            raise _refuse(f"is under {system}, a system directory; pick another run_dir")
    if path.exists() and not path.is_dir():
        raise _refuse("is an existing file, not a directory; pick another run_dir")
    # The directory itself if it exists, else its nearest existing parent, which must let us create it.
    existing = path if path.exists() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not existing.is_dir():
        raise _refuse(f"cannot be created: {existing} is a file, not a directory; pick another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise _refuse(f"{what} (permission denied or a read-only file system); pick another run_dir")
    return path


# --- one run at a time --------------------------------------------------------------------------


def _holder(lock_file: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file ({} if unreadable); it writes right after locking."""
    for _ in range(20):
        try:
            text = lock_file.read_text()
            if text.strip():
                info = json.loads(text)
                return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return {}


def _describe(info: dict[str, Any]) -> str:
    if "pid" not in info:
        return "another process"
    started = f" (started {info['started']})" if info.get("started") else ""
    return f"pid {info['pid']} on host {info.get('host', '?')}{started}"


class RunDirLock:
    """The exclusive lock on ``<run_dir>/.lock`` that :func:`acquire` took; :meth:`release` (or leaving
    the ``with`` block, or the process ending in any way) gives it back. Releasing twice is a no-op."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = fd
        self._pid = os.getpid()
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def _forget(self) -> None:
        """In a forked child: close the inherited descriptor (the parent's lock is unaffected)."""
        if self._fd is not None and self._pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no holder any more (the file stays: see the module docstring)
        os.close(fd)  # the last descriptor of this open file: the kernel drops the lock

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        return f"RunDirLock({str(self.run_dir)!r}, held={self.held})"


def acquire(run_dir: str | os.PathLike[str], *, create: bool = True) -> RunDirLock:
    """Create ``run_dir`` if needed (``create``) and lock it for this process (non-blocking).

    If another process holds it: one ConfigError line ``run_dir=X is in use by pid P on host H
    (started T): wait for it, or pick another run_dir``. A second acquire in the same process
    (without releasing the first) is refused the same way, naming this process.
    """
    run_dir = Path(run_dir)
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir} cannot be created: {e.strerror or e}; pick another run_dir") from None
    lock_file = run_dir / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:  # another user's lock file in a shared directory: reading is enough to lock
        try:
            fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"run_dir={run_dir}: cannot open {lock_file}: {e.strerror or e}; "
                              "pick another run_dir") from None
    except OSError as e:
        raise ConfigError(f"run_dir={run_dir}: cannot open {lock_file}: {e.strerror or e}; pick another run_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"run_dir={run_dir} is in use by {_describe(_holder(lock_file))}: "
                          "wait for it, or pick another run_dir") from None
    except OSError as e:  # e.g. a file system without locks
        os.close(fd)
        raise ConfigError(f"run_dir={run_dir}: cannot lock {lock_file}: {e.strerror or e}; "
                          "pick another run_dir") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    with contextlib.suppress(OSError):  # read-only descriptor: the lock holds, the holder stays anonymous
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return RunDirLock(run_dir, fd)


def share(run_dir: str) -> str:
    """Rank 0's run dir on every rank (``${now:...}`` may differ by a second between ranks); collective
    under torchrun. A rank whose Hydra made a different, fresh directory removes it."""
    from lbc.run import distributed  # torch: imported only where a run needs it

    chosen = distributed.broadcast_object(run_dir)
    own = Path(run_dir)
    if chosen != run_dir and own.is_dir() and {p.name for p in own.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(own, ignore_errors=True)
    return chosen


def claim(run_dir: str | os.PathLike[str]) -> RunDirLock | None:
    """:func:`check_usable` and :func:`acquire` on rank 0 (or the only process); every rank raises
    rank 0's ConfigError if it refused, so all of them stop. Returns the lock on rank 0, None elsewhere.

    Call after the ranks agreed on ``run_dir`` (:func:`share`); collective under torchrun.
    """
    from lbc.run import distributed  # torch: imported only where a run needs it

    lock, refused = None, None
    if distributed.is_main():
        try:
            lock = acquire(check_usable(run_dir))
        except (ConfigError, OSError) as e:  # never leave the other ranks waiting in the broadcast
            refused = str(e) if isinstance(e, ConfigError) else f"run_dir={run_dir}: {e}; pick another run_dir"
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise ConfigError(refused)
    return lock


# --- after a failed start -----------------------------------------------------------------------


def remove_if_unused(run_dir: str | os.PathLike[str]) -> bool:
    """Remove ``run_dir`` if it holds no run: nothing but Hydra's ``.hydra/`` and ``train.log`` and our
    ``.lock`` (what a run that failed at start-up leaves). Returns whether it was removed.

    Never touches the current directory or one above it, a symlink, a directory with anything else
    in it (config.yaml, metrics.jsonl, last.pt: a run got going there), or one whose lock another
    live process holds (a run that is starting there now).
    """
    path = Path(run_dir)
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        resolved, cwd = path.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            return False
        names = {p.name for p in path.iterdir()}
        if not names <= BOOKKEEPING or ((path / ".hydra").exists() and not (path / ".hydra").is_dir()):
            return False
        try:
            lock = acquire(path, create=False)
        except ConfigError:  # a live run holds it (or another rank removed it just now)
            return False
        with lock:
            shutil.rmtree(path / ".hydra", ignore_errors=True)
            (path / "train.log").unlink(missing_ok=True)
            (path / LOCK_NAME).unlink(missing_ok=True)
        path.rmdir()
        return True
    except OSError:
        return False


# Hydra flags after which no single-run output directory is made (multirun uses hydra.sweep.dir;
# the others print and exit).
_NO_RUN_DIR = ("-m", "--multirun", "-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "-sc",
               "--shell-completion")


def check_argv(argv: list[str]) -> None:
    """Before Hydra creates its output directory: refuse an unusable ``run_dir=`` / ``hydra.run.dir=``
    override in ``argv`` (``lbc-train``'s arguments; ``run_dir=''`` would make Hydra write
    ``.hydra/`` and ``train.log`` into the current directory before any check of ours runs).
    Sweeps, interpolations, multirun/``--cfg``/``--help`` invocations and what does not parse are
    left to Hydra and to the trainer's own check.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a in _NO_RUN_DIR or a.split("=", 1)[0] in _NO_RUN_DIR for a in argv):
        return
    keys = ("run_dir", "hydra.run.dir")
    wanted = [a for a in argv if not a.startswith("-") and "=" in a and a.lstrip("+").split("=", 1)[0] in keys]
    if not wanted:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(wanted)
    except Exception:  # noqa: BLE001  (Hydra reports its own parse errors)
        return
    for o in parsed:
        if o.is_sweep_override() or o.is_delete():
            continue
        value = o.value()
        if isinstance(value, str) and "${" not in value:
            check_usable(value, key=o.key_or_group)

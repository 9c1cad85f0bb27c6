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

Nothing is written into a run directory before its lock is held and the run accepted: Hydra's own
record (``.hydra/``) is off (``hydra.output_subdir: null`` in train.yaml) and written by
:meth:`lbc.run.lifecycle.Run.begin` instead, and ``train.log`` is a :class:`RunLog`, which keeps the
records in memory until the run begins. A refused second run (a bad value, a refused resume, a
directory another run holds) leaves an existing run's files byte for byte as they were.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import weakref
from pathlib import Path
from typing import Any

from lbc.errors import ConfigError

LOCK_NAME = ".lock"
HYDRA_DIR = ".hydra"  # Hydra's record of a job (config.yaml, hydra.yaml, overrides.yaml), written by Run.begin
LOG_NAME = "train.log"  # the run's log (RunLog, Hydra's job logging: lbc/configs/hydra/job_logging/lbc.yaml)
# Hydra's record, the log and our lock file: a directory holding nothing else has no run in it (see
# remove_if_unused; .hydra/ and train.log are there only once a run began, or from older versions).
BOOKKEEPING = frozenset({HYDRA_DIR, LOG_NAME, LOCK_NAME})
SYSTEM_DIRS = ("/proc", "/sys", "/dev")

_HELD: weakref.WeakSet[RunDirLock] = weakref.WeakSet()

# What the folders on the way to a run directory were before this process created any of them
# (note_parents, from check_argv: before Hydra makes its output directory): absolute path -> the names it
# held then, None where it did not exist, _UNLISTED where it existed but could not be listed.
_BEFORE: dict[str, frozenset[str] | None] = {}
_UNLISTED: frozenset[str] = frozenset({"\0"})  # a name no folder holds: nothing below it counts as new


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
    _check_length(text, key)
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


def short(text: str, keep: int = 60) -> str:
    """``text``, or its start and its length when it is long (a message stays one readable line)."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


def _check_length(text: str, key: str) -> None:
    """Refuse a path the system cannot create: a component over ``NAME_MAX`` bytes, or an absolute path
    of ``PATH_MAX`` bytes or more (the limits of the file system it would be made on, read with
    ``os.pathconf``; 255 and 4096 on Linux). One ConfigError line naming ``key`` and the limit."""
    absolute = os.path.abspath(text)
    existing = next((p for p in [absolute, *map(str, Path(absolute).parents)] if os.path.isdir(p)), os.sep)
    limits = {}
    for name, fallback in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits[name] = os.pathconf(existing, name)
        except (OSError, ValueError):
            limits[name] = fallback
    for part in Path(absolute).parts:
        size = len(os.fsencode(part))
        if size > limits["PC_NAME_MAX"]:
            raise ConfigError(f"{key}={short(text)}: a folder name of {size} bytes ({short(part, 20)}) is over "
                              f"the file system's limit of {limits['PC_NAME_MAX']} bytes per name (NAME_MAX); "
                              "use shorter names")
    size = len(os.fsencode(absolute))
    if size >= limits["PC_PATH_MAX"]:
        raise ConfigError(f"{key}={short(text)}: the path is {size} bytes long (as an absolute path), over the "
                          f"system's limit of {limits['PC_PATH_MAX'] - 1} bytes (PATH_MAX); use a shorter run_dir")


# --- the run's log: nothing in the run directory before the run begins ---------------------------


class RunLog(logging.Handler):
    """``<run_dir>/train.log`` (Hydra's job log, ``lbc/configs/hydra/job_logging/lbc.yaml``), opened only
    when the run begins (:func:`open_run_log`, from :meth:`lbc.run.lifecycle.Run.begin`: the directory
    locked, the config and any resume accepted). Until then the records wait in memory (the last
    ``capacity``) and are written first; a run refused before it began writes nothing, so an existing
    run's ``train.log`` stays byte for byte as it was. ``mode``/``encoding``: as ``logging.FileHandler``'s.
    """

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = "utf-8", capacity: int = 10_000) -> None:
        super().__init__()
        self.filename = os.path.abspath(os.fspath(filename))
        self.mode, self.encoding = mode, encoding
        self._waiting: collections.deque[str] = collections.deque(maxlen=capacity)
        self._file: logging.FileHandler | None = None
        self._dropped = False

    @property
    def opened(self) -> bool:
        return self._file is not None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif not self._dropped:
            try:
                self._waiting.append(self.format(record))
            except Exception:  # noqa: BLE001  (logging's own rule: report it, never raise from a handler)
                self.handleError(record)

    def open(self) -> None:
        """Open the file (appending, as Hydra's FileHandler did) and write the records that waited."""
        with self._locked():
            if self._file is not None or self._dropped:
                return
            file = logging.FileHandler(self.filename, self.mode, encoding=self.encoding)
            file.setFormatter(self.formatter)
            for line in self._waiting:
                file.stream.write(line + file.terminator)
            file.flush()
            self._waiting.clear()
            self._file = file

    def drop(self) -> None:
        """Never write (a rank other than 0: rank 0 alone keeps the run's log)."""
        with self._locked():
            self._dropped = True
            self._waiting.clear()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        with self._locked():
            if self._file is not None:
                self._file.close()
                self._file = None
            self._waiting.clear()
        super().close()

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def __repr__(self) -> str:
        return f"RunLog({self.filename!r}, opened={self.opened})"


def run_logs() -> list[RunLog]:
    """The root logger's :class:`RunLog` handlers (Hydra's job logging puts one there)."""
    return [h for h in logging.getLogger().handlers if isinstance(h, RunLog)]


def open_run_log(run_dir: str | os.PathLike[str]) -> None:
    """The run in ``run_dir`` began: open its log (each :class:`RunLog` whose file is in ``run_dir``)."""
    here = os.path.realpath(os.fspath(run_dir))
    for handler in run_logs():
        if os.path.realpath(os.path.dirname(handler.filename)) == here:
            handler.open()


def drop_run_log() -> None:
    """This process never writes the run's log (a rank other than 0)."""
    for handler in run_logs():
        handler.drop()


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


def note_parents(path: str | os.PathLike[str]) -> None:
    """Remember what ``path`` and the folders above it are now, up to the first that exists (and the names
    that one holds), before this process creates any of them: :func:`remove_created_parents` later removes
    only folders this note shows were made after it. Creates nothing; within one start (see
    :func:`check_argv`, which begins a new note) a folder noted before keeps its first note."""
    current = os.path.abspath(os.fspath(path))
    while True:
        exists = os.path.lexists(current)
        if not exists:
            names = None
        elif os.path.isdir(current) and not os.path.islink(current):
            try:
                names = frozenset(os.listdir(current))
            except OSError:
                names = _UNLISTED
        else:
            names = _UNLISTED  # a file or a symlink where a folder will be: never removed
        _BEFORE.setdefault(current, names)
        parent = os.path.dirname(current)
        if exists or parent == current:
            return
        current = parent


def _created_here(path: str) -> bool:
    """``path`` (absolute) was made after :func:`note_parents` looked: noted as absent, or below a folder
    noted as absent, or a name its nearest noted parent did not hold then. Unknown: False."""
    below: str | None = None  # the child of `current` on the way down to `path`
    current = path
    while True:
        if current in _BEFORE:
            names = _BEFORE[current]
            if names is None:
                return True
            return below is not None and names is not _UNLISTED and os.path.basename(below) not in names
        parent = os.path.dirname(current)
        if parent == current:
            return False
        below, current = current, parent


def remove_created_parents(run_dir: str | os.PathLike[str]) -> list[Path]:
    """After ``run_dir`` was removed: remove each folder above it that is empty now and was created by this
    process (:func:`note_parents` recorded it as absent, or as a new name in a folder it listed); stop at the
    first that is not. Returns the folders removed.

    The safe rule: a folder whose state before the run is unknown (nothing noted it) stays, and so do the
    current directory and those above it, symlinks, and a folder that holds anything (another run's
    directory, a user's file). The one exception to "empty": a sweep folder this process created that holds
    only Hydra's ``multirun.yaml`` (a multirun whose job failed at start-up; lbc-train then exits, so no job
    of that sweep follows).
    """
    removed: list[Path] = []
    cwd = os.path.realpath(os.getcwd())
    current = os.path.dirname(os.path.abspath(os.fspath(run_dir)))
    while current != os.path.dirname(current):
        real = os.path.realpath(current)
        if os.path.islink(current) or real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
            break
        if not _created_here(current):
            break
        try:
            names = set(os.listdir(current))
            if names == {"multirun.yaml"}:
                os.unlink(os.path.join(current, "multirun.yaml"))
            elif names:
                break
            os.rmdir(current)
        except OSError:  # another process put something there just now, or it went already
            break
        removed.append(Path(current))
        current = os.path.dirname(current)
    return removed


def remove_if_unused(run_dir: str | os.PathLike[str]) -> bool:
    """Remove ``run_dir`` if it holds no run: nothing but Hydra's ``.hydra/`` and ``train.log`` and our
    ``.lock`` (what a run that failed at start-up leaves), then the folders above it that this process
    created for it and that are empty now (:func:`remove_created_parents`). Returns whether ``run_dir``
    was removed.

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
    except OSError:
        return False
    remove_created_parents(path)
    return True


# Hydra flags after which no single-run output directory is made (multirun uses hydra.sweep.dir;
# the others print and exit).
_NO_RUN_DIR = ("-m", "--multirun", "-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "-sc",
               "--shell-completion")


def _static_prefix(value: str) -> str:
    """The folders of a directory pattern before its first interpolation (``outputs/${now:...}`` -> ``outputs``)."""
    if "${" not in value:
        return value
    head = value.split("${", 1)[0]
    return head if head.endswith(("/", os.sep)) else os.path.dirname(head)


def _default_dirs() -> list[str]:
    """``run_dir`` and ``hydra.sweep.dir`` as lbc's shipped train.yaml writes them (patterns)."""
    from omegaconf import OmegaConf

    try:
        train = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "train.yaml"),
                                       resolve=False)  # the patterns as written (${now:...} is Hydra's resolver)
        values = [train.get("run_dir"), train.get("hydra", {}).get("sweep", {}).get("dir")]
    except Exception:  # noqa: BLE001  (no note: nothing above a run dir is removed)
        return []
    return [v for v in values if isinstance(v, str)]


def check_argv(argv: list[str]) -> None:
    """Before Hydra creates its output directory: refuse an unusable ``run_dir=`` / ``hydra.run.dir=``
    override in ``argv`` (``lbc-train``'s arguments; ``run_dir=''`` would make Hydra write
    ``.hydra/`` and ``train.log`` into the current directory before any check of ours runs).
    Sweeps, interpolations, multirun/``--cfg``/``--help`` invocations and what does not parse are
    left to Hydra and to the trainer's own check.

    It also notes (:func:`note_parents`) what the folders a run directory may be made in are now, before
    Hydra creates any: the ``run_dir`` / ``hydra.run.dir`` / ``hydra.sweep.dir`` overrides, else lbc's
    defaults (``outputs/...``, ``multirun/...``), up to their first interpolation; after a failed start
    the ones this process created go again (:func:`remove_if_unused`).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = ("run_dir", "hydra.run.dir")
    wanted = [a for a in argv if not a.startswith("-") and "=" in a
              and a.lstrip("+").split("=", 1)[0] in (*keys, "hydra.sweep.dir")]
    try:
        parsed = OverridesParser.create().parse_overrides(wanted)
    except Exception:  # noqa: BLE001  (Hydra reports its own parse errors)
        parsed = []
    _BEFORE.clear()  # a new start: what the folders are now, before Hydra makes any
    patterns = [o.value() for o in parsed if not o.is_sweep_override() and not o.is_delete()]
    for pattern in [p for p in patterns if isinstance(p, str)] + _default_dirs():
        if _static_prefix(pattern).strip():
            note_parents(_static_prefix(pattern))

    if any(a in _NO_RUN_DIR or a.split("=", 1)[0] in _NO_RUN_DIR for a in argv):
        return
    for o in parsed:
        if o.key_or_group not in keys:
            continue
        if o.is_sweep_override() or o.is_delete():
            continue
        value = o.value()
        if isinstance(value, str) and "${" not in value:
            check_usable(value, key=o.key_or_group)

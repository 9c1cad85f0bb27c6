"""Reading ``.pt`` files at the boundary, weights only: a missing, broken or unsafe file is one line
naming the config key.

Every ``.pt`` that lbc reads goes through :func:`read_pt`, which unpickles with
``torch.load(..., weights_only=True)``: tensors, plain containers (dict, list, tuple, str, numbers)
and the few torch types torch itself allows. A pickle that names any other global (a class or a
function: the way a ``.pt`` file runs code when it is loaded) is refused before anything of it runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import pickletools
import re
import secrets
import stat
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lbc.errors import ConfigError, WriteError, first_line

# The one allow-list of globals lbc's loading accepts beyond torch's weights-only defaults.
# Empty on purpose: what our checkpoints hold (state dicts of the model, optimizer, timm's
# scheduler, GradScaler and EMA; the sparsity state; RNG states, numpy's stored as tensors and
# ints by lbc.engine.checkpoint.rng_state; the config as plain containers; metrics as floats) all
# loads without one. Add a global here only if a checkpoint lbc writes needs it, with the reason.
SAFE_GLOBALS: list[Any] = []

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """The globals a refused file names, read from its pickle opcodes (nothing runs), else from ``err``."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))  # torch.save's zip format
    except Exception:  # noqa: BLE001 (a bare pickle, the legacy format: scan it ourselves)
        found = _pickle_globals(path)
    found = found or _GLOBAL.findall(str(err))
    return [name for name in found if _DOTTED.fullmatch(name)]  # text read as opcodes names no real global


_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}


def _pickle_globals(path: Path, pickles: int = 5) -> list[str]:
    """Globals named by the first ``pickles`` pickles of a file (a bare pickle; torch's legacy format
    is a few pickles, then raw storage bytes). Only :func:`pickletools.genops`: nothing is executed."""
    found: list[str] = []
    with path.open("rb") as f:
        for _ in range(pickles):
            strings: list[str] = []
            memo: dict[Any, str] = {}
            memoized = 0  # MEMOIZE numbers every object it stores, strings or not
            last = None  # the string the previous opcode pushed, if any (for the memo)
            try:
                for op, arg, _pos in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    if op.name in _STRINGS:
                        last = str(arg)
                        strings.append(last)
                        continue
                    if op.name == "MEMOIZE":
                        if last is not None:
                            memo[memoized] = last
                        memoized += 1
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and last is not None:
                        memo[arg] = last
                    elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                        last = memo[arg]
                        strings.append(last)
                        continue
                    if op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"):
                        last = None
            except Exception:  # noqa: BLE001 (the end of the pickles: raw bytes, or the end of the file)
                break
    return [name for name in dict.fromkeys(found) if name not in _allowed()]


def _allowed() -> set[str]:
    """Globals torch's weights-only unpickler takes by default (private API: empty if it moved)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # noqa: BLE001
        return set()


def read_pt(path: str | Path, key: str, safe_globals: list[Any] | None = None) -> Any:
    """``torch.load`` onto the CPU, weights only; a one-line ConfigError naming ``key`` if the file is
    missing, unreadable, or needs pickled code (a global outside :data:`SAFE_GLOBALS` and ``safe_globals``)
    to load. A refused file's message names the globals it needs, never torch's advice to load it with
    ``weights_only=False`` (that would run the file's code). torch's warnings about pickle protocols (a
    bare pickle file) are not shown: the one line says what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such checkpoint file")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([*SAFE_GLOBALS, *(safe_globals or [])]):
            warnings.filterwarnings("ignore", message=r".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = _unsafe_globals(path, err)
        if needs:
            what = ", ".join(needs[:3]) + (f" and {len(needs) - 3} more" if len(needs) > 3 else "")
            raise ConfigError(
                f"{key}={str(path)!r} is not a checkpoint lbc can load safely: it needs {what} (pickled code); "
                "lbc loads weights only"
            ) from None
        raise ConfigError(f"{key}={str(path)!r} is not a readable checkpoint: {_unpickler_line(err)}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ConfigError(f"{key}={str(path)!r} is not a readable checkpoint: {_unpickler_line(err)}") from None
    except (KeyError, IndexError, TypeError, AttributeError):  # text or random bytes read as a pickle stream
        raise ConfigError(f"{key}={str(path)!r} is not a readable checkpoint: not a torch save file") from None


# The sentences torch puts around the unpickler's complaint: advice (weights_only=False runs the file's code),
# not what is wrong with the file.
_ADVICE = ("weights only load failed", "weights_only", "please file an issue", "check the documentation",
           "do it only if", "torch.serialization.")


def _unpickler_line(err: BaseException) -> str:
    """The weights-only unpickler's own complaint (``Unsupported operand 110``), not torch's advice around it."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [" ".join(line.split()) for line in text.splitlines()]
    useful = [line for line in lines if line and not any(a in line.lower() for a in _ADVICE)]
    return useful[0] if useful else "torch's weights-only unpickler refused it"


def load_model_weights(model: nn.Module, path: str | Path, key: str) -> None:
    """Load the dense weights of a checkpoint into ``model`` (before a sparsity method is attached).

    Accepts ``{"model": state_dict}`` (our checkpoints) or a plain state dict; strips DDP's
    ``module.`` prefixes and drops a sparsity method's own tensors (keys with ``.parametrizations.``:
    masks and scores of the earlier run are not ours). Every problem is a one-line ConfigError
    naming ``key``: a missing, unreadable or unsafe file, no state dict inside, keys or shapes that
    do not fit.
    """
    state = read_pt(path, key)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"{key}={str(path)!r} holds no state dict (expected a 'model' entry or a state dict)")
    state = {k: v for k, v in strip_module_prefix(state).items() if ".parametrizations." not in k}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ConfigError(f"{key}={str(path)!r} does not fit the model: {first}") from None


# --- writing and state-dict keys -----------------------------------------------------------------

V = TypeVar("V")


# Why a write fails that is no bug of lbc's: a full disk, a quota, a read-only file system, no permission.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a parent of it is a file, not a directory",
                errno.EEXIST: "a parent of it is a file, not a directory"}


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` to a temp file beside ``path``, flushed to disk, then ``os.replace``: never half a file.

    The one atomic writer of lbc (checkpoints, config.yaml, metrics.jsonl rewrites, exports, converted
    backbones). The temp file is ``.<name>.<8 random characters>.tmp`` (one left by a killed process is
    removed by :func:`lbc.engine.checkpoint.clean_stale_temp`). The result has the permissions a plain
    ``open(path, "w")`` would give a new file, ``0o666 & ~umask``: the temp file is created with mode 0o666
    and the kernel applies the process umask (``tempfile.mkstemp``'s 0600 would make ``last.pt`` private to
    its writer on a shared cluster), and that mode is set again after ``write`` in case it replaced the file.

    A write that fails for a reason of the storage (:data:`WRITE_ERRNOS`: disk full, quota, read-only, no
    permission, a parent that is a file; or torch's zip writer reporting a failed write) is a one-line
    :class:`~lbc.errors.WriteError` naming ``path`` and the reason; the temp file is removed and a previous
    file at ``path`` is left as it was.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask, as the kernel made it: no umask() round trip
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # write() may have replaced the file (os.replace into tmp)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        failure = _write_failure(err)
        if failure is None:
            raise
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {failure}; {kept} (free space or fix the permissions, then run "
                         "the same command again)", getattr(err, "errno", None)) from None
    return path


def storage_error(err: BaseException, path: str | Path) -> WriteError | None:
    """The one-line WriteError for ``err`` raised while writing ``path`` (a folder or a file) by code other than
    :func:`atomic_write` (a library's own save), when the storage is the cause; None for anything else."""
    failure = _write_failure(err)
    return None if failure is None else WriteError(f"cannot write {path}: {failure} (free space or fix the "
                                                   "permissions, then run the same command again)",
                                                   getattr(err, "errno", None))


def _write_failure(err: BaseException) -> str | None:
    """The reason a write failed when it is the storage's (see :data:`WRITE_ERRNOS`), else None (a bug: re-raised)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return f"{WRITE_ERRNOS[err.errno]} ({errno.errorcode[err.errno]})"
    if isinstance(err, RuntimeError) and "write failed" in str(err).lower():  # torch.save's zip writer (ENOSPC)
        return f"the write failed ({first_line(err)}): is the disk full?"
    return None


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty ``.<name>.<random>.tmp`` beside ``path``, opened (O_EXCL) with mode 0o666 less the umask."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")


def strip_module_prefix(state: Mapping[str, V]) -> dict[str, V]:
    """State-dict keys without the ``module.`` that DDP / EMA wrappers put in front (one level)."""
    return {str(k).removeprefix("module."): v for k, v in state.items()}

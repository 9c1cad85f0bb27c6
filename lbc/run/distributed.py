"""torchrun/DDP plumbing: process group set-up, rank helpers, reductions, the DDP (re)wrap, shutdown.

Every collective is bounded: the process group is made with ``timeout=`` :func:`timeout`, read from the
environment variable ``LBC_DIST_TIMEOUT`` (seconds, default 600), so a rank that stops answering (frozen
by SIGSTOP, hung in I/O, its machine gone) ends the run on the others after that long instead of
stalling them forever. Each rank also beats a counter in the job's store (:func:`silent_ranks`), so the
one-line error can name the rank(s) that stopped answering (:func:`link_failure_line`).

Under ``lbc-torchrun`` (``LBC_TORCHRUN_REPORTS`` names a folder) the ranks report their one-line errors
and rank 0 its run directory there (:func:`report`, :func:`note_run_dir`); the launcher prints the one
line (``lbc/cli/torchrun.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lbc.errors import ConfigError

log = logging.getLogger("lbc")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_by_torchrun():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(f"trainer.device={name}: this machine has {have}; use trainer.device=auto or cpu")
        torch.cuda.set_device(device)
    return device


TIMEOUT_ENV = "LBC_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
REPORTS_ENV = "LBC_TORCHRUN_REPORTS"
_BEAT_KEY = "lbc/alive/"
_beat: dict[str, Any] = {}  # the heartbeat's interval and start (set by init)


def timeout() -> timedelta:
    """How long a collective waits for the other ranks: ``LBC_DIST_TIMEOUT`` seconds (default 600, for gloo
    and nccl alike). A value that is not a positive number is one ConfigError line naming the variable."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r} is not allowed; use a positive number of seconds "
                          f"(the default is {DEFAULT_TIMEOUT_S:g})")
    return timedelta(seconds=seconds)


def init(device: torch.device) -> None:
    """Join the process group when started by torchrun (nccl on CUDA, gloo on CPU), its collectives bounded by
    :func:`timeout`, and start this rank's heartbeat; no-op otherwise."""
    if launched_by_torchrun() and not is_distributed():
        bound = timeout()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=bound)
        _start_heartbeat(bound)


def _store(seconds: float) -> Any:
    """A client of the job's key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT), or None."""
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=seconds), wait_for_workers=False)
    except Exception:  # noqa: BLE001  (no store to reach: the error line names no rank)
        return None


def _start_heartbeat(bound: timedelta) -> None:
    """A daemon thread adds 1 to ``lbc/alive/<rank>`` in the store every ``interval`` seconds (a tenth of the
    timeout, 0.5 to 2 s); a rank that is frozen or gone stops counting (:func:`silent_ranks`)."""
    interval = min(2.0, max(0.5, bound.total_seconds() / 10))
    store = _store(interval * 4)
    if store is None:
        return
    key = f"{_BEAT_KEY}{rank()}"

    def beat() -> None:
        while True:
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001  (the store went: nothing left to tell)
                return
            time.sleep(interval)

    threading.Thread(target=beat, name="lbc-heartbeat", daemon=True).start()
    _beat.update(interval=interval)


def silent_ranks() -> list[int] | None:
    """The other ranks whose heartbeat stopped (frozen, hung or gone), watched for about 2.5 beats; None
    when it cannot be told (no heartbeat, the store does not answer)."""
    if not _beat or not is_distributed():
        return None
    interval = _beat["interval"]
    store = _store(interval * 2)
    if store is None:
        return None
    keys = [f"{_BEAT_KEY}{r}" for r in range(world_size())]
    stops = {signal.SIGTERM, signal.SIGINT}  # torchrun sends SIGTERM once a rank failed: finish the line first
    blocked = threading.current_thread() is threading.main_thread()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # the caller exits without unblocking (exit_now)
    try:
        before = [store.add(k, 0) for k in keys]
        time.sleep(2.5 * interval)
        after = [store.add(k, 0) for k in keys]
    except Exception:  # noqa: BLE001
        return None
    return [r for r in range(len(keys)) if after[r] == before[r] and r != rank()]


# What gloo and nccl say when a peer did not answer in time or went away (their errors are plain RuntimeErrors)
_LINK_PHRASES = ("timed out waiting", "application timeout", "pair closure", "connection closed by peer",
                 "connection reset by peer", "communicator was aborted", "collective operation timeout")
_LINK_WORDS = ("timeout", "timed out", "broken pipe", "socket closed")  # only with a backend's name beside


def is_link_failure(err: BaseException) -> bool:
    """``err`` is a collective that failed because another rank did not answer in time or went away (the
    process group's errors, torch's ``DistError`` family, or gloo's / nccl's RuntimeError saying so)."""
    if not is_distributed():
        return False
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        any(p in text for p in _LINK_PHRASES)
        or any(w in text for w in _LINK_WORDS) and any(w in text for w in ("gloo", "nccl", "c10d", "processgroup")))


def timed_out(err: BaseException) -> bool:
    """A link failure (:func:`is_link_failure`) that is a timeout: the peer was there but did not answer."""
    return any(w in str(err).lower() for w in ("timed out", "timeout"))


def link_failure_line(err: BaseException) -> tuple[str, bool]:
    """The one line for a collective that failed (:func:`is_link_failure`), and whether this rank prints it
    (the lowest rank still answering, so that one line is printed; every rank when that cannot be told).

    Names the rank(s) that stopped answering when the heartbeats tell (:func:`silent_ranks`)."""
    silent = silent_ranks()
    me = rank()
    if timed_out(err):
        how, why = f"did not answer within {timeout().total_seconds():g} s ({TIMEOUT_ENV})", "frozen (SIGSTOP), hung or gone"
    else:
        how, why = "went away (its connection closed)", "killed, crashed or gone"
    if silent:
        who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"
        line = f"{who} {how}: {why}; the run stopped on the other ranks"
        prints = me == min(r for r in range(world_size()) if r not in silent)
    else:
        line = f"rank {me}: another rank {how}: {why}; the run stopped"
        prints = True
    return line, prints


def report(status: int, message: str, kind: str = "error") -> bool:
    """Under ``lbc-torchrun``: leave this rank's one line (``status``: its exit status; ``kind``: ``error``,
    ``timeout`` (a peer did not answer: it comes before torchrun kills that peer) or ``stop``) for the launcher, which prints it. Returns whether it was left (False: not under
    lbc-torchrun, or the folder cannot be written; the caller prints it itself)."""
    folder = os.environ.get(REPORTS_ENV)
    if not folder:
        return False
    where = Path(folder) / f"rank{os.environ.get('RANK', rank())}.json"
    try:
        where.write_text(json.dumps({"status": status, "message": message, "kind": kind, "time": time.time()}))
    except OSError:
        return False
    return True


def note_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Under ``lbc-torchrun``, on rank 0: tell the launcher the run directory (for its resume hint)."""
    folder = os.environ.get(REPORTS_ENV)
    if folder and is_main():
        try:
            (Path(folder) / "run_dir").write_text(os.path.abspath(os.fspath(run_dir)))
        except OSError:
            pass


def exit_now(status: int) -> None:
    """Exit at once with ``status`` after a collective failed: leaving the process group would wait for the
    ranks that stopped answering (the kernel still releases the run dir's lock)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running stats) on every rank: DDP syncs them only before a forward."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself.

    DDP fixes the set of parameters it reduces at construction: a sparsity method's own tensors
    must be excluded before (``SparsityMethod.exclude_from_ddp``), so that freezing its scores
    later needs no new wrapper.
    """
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def shutdown() -> None:
    """Leave the process group and exit at once: gloo sometimes aborts at interpreter exit.

    Only call after a clean end of training; ``os._exit`` skips the remaining atexit handlers.
    """
    if not is_distributed():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Replica:
    """The model as the training step calls it: DDP-wrapped (and compiled) when asked.

    ``module`` is the plain model (state dicts, EMA, evaluation); it is wrapped once.
    """

    def __init__(
        self, module: nn.Module, device: torch.device, compile: bool = False, find_unused_parameters: bool = False
    ) -> None:
        self.module = module
        wrapped = wrap(module, device, find_unused_parameters)
        self.forward: nn.Module = torch.compile(wrapped) if compile else wrapped

    def train(self, mode: bool = True) -> None:
        self.forward.train(mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

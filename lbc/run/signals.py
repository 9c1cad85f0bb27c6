"""Stopping a run cleanly on SIGTERM (what SLURM and Kubernetes send before they kill), on SIGUSR1 (SLURM's
``--signal=USR1@<seconds>`` warning before a time limit or preemption) and on a first Ctrl-C.

:class:`GracefulStop` installs handlers that only record the signal (``stop.requested`` is its name,
e.g. ``'SIGTERM'``). The trainer asks after every optimizer step (:meth:`GracefulStop.batches`
wraps the training loader: it ends the epoch's iteration once a stop is requested, before fetching
another batch) and at every epoch end, then writes what it can, says so in one line and raises
:class:`Stopped`; ``lbc-train`` exits with :attr:`Stopped.exit_code` (143 for SIGTERM, 130 for
SIGINT, 138 for SIGUSR1: 128 + the signal number, the shell's convention). A second signal ends the
process at once, by that signal. Inside a SLURM job (``SLURM_JOB_ID`` set) a stop on SIGUSR1 also
requeues the job (:func:`requeue`, ``scontrol requeue``), so that it starts again and resumes.

Under ``torchrun`` every rank gets the signal, but not at the same step: :meth:`GracefulStop.agreed`
is collective (a one-number all-reduce on a CPU gloo group, no CUDA synchronisation), so all ranks
stop after the same step and their collectives stay matched.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REQUEUE_SIGNAL = "SIGUSR1"  # the signal sbatch --signal=USR1@<seconds> sends: save, requeue, exit


class Stopped(Exception):
    """The run stopped on a signal after saving what it could; ``str()`` is the one line it logged."""

    def __init__(self, message: str, signal_name: str, exit_code: int) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.exit_code = exit_code


class GracefulStop:
    """``with GracefulStop() as stop:`` ... ``if stop.requested: break`` (the signal's name, or None).

    Only the main thread of the main interpreter can install signal handlers; elsewhere this is
    inert (``requested`` stays None). Handlers are restored on exit. A process forked inside the
    block (a DataLoader worker) inherits the handlers and ignores these signals: its parent stops it.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.requested: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._agreed = False
        self._group: Any = None

    # --- handlers ------------------------------------------------------------------------------

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child (DataLoader worker): the parent decides
            return
        if self.signum is not None:  # the second signal: end now, by that signal (exit status 128 + signum)
            print(f"{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        self.requested = signal.Signals(signum).name

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as the signal ``signum`` would (for callers that learn of it another way)."""
        if self.signum is None:
            self.signum, self.requested = int(signum), signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number (143 for SIGTERM, 130 for SIGINT); 0 if no stop was requested."""
        return 128 + self.signum if self.signum is not None else 0

    # --- agreeing, under torchrun ---------------------------------------------------------------

    def agreed(self, communicate: bool = True) -> bool:
        """Whether any rank was asked to stop (every rank must call this at the same points);
        ``bool(self.requested)`` in a single process. Once True it stays True without communicating.

        Under torchrun, ``communicate=False`` answers False without the all-reduce (unless already
        agreed): the per-batch check asks the other ranks only every few steps, not on every step.
        """
        if self._agreed:
            return True
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self._agreed = self.requested is not None
            return self._agreed
        if not communicate:
            return False
        import torch

        if self._group is None:  # a CPU group for the flag: no CUDA sync in the training step
            self._group = _cpu_group()
        flag = torch.tensor([1 if self.requested is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.requested is None:  # another rank got it first: stop as it does
            self.request(signal.SIGTERM)
        self._agreed = bool(flag.item())
        return self._agreed

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (collective under torchrun, on the same CPU group as
        :meth:`agreed`; every rank must call it at the same point); ``flag`` itself in one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        import torch

        if self._group is None:
            self._group = _cpu_group()
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(value.item())

    def batches(self, loader: Any) -> UntilStopped:
        """``loader`` for one epoch of ``train_one_epoch``, ending early once :meth:`agreed` says stop."""
        return UntilStopped(loader, self)

    def __repr__(self) -> str:
        return f"GracefulStop(requested={self.requested!r})"


def _cpu_group() -> Any:
    """A gloo group for the stop flag (the world group under gloo), bounded by ``LBC_DIST_TIMEOUT`` as the
    world group is (:func:`lbc.run.distributed.timeout`; a new group would wait torch's 30 minutes)."""
    import torch.distributed as dist

    from lbc.run.distributed import timeout

    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout())


AGREE_EVERY = 8  # under torchrun, steps between two all-reduces of the stop flag (a CPU round trip each)


class UntilStopped:
    """Iterates ``loader`` but asks ``stop.agreed()`` before every batch it fetches (that is, after the
    previous batch's optimizer step) and ends the iteration there if a stop was requested. Under
    torchrun the ranks compare flags every :data:`AGREE_EVERY` steps (the same steps on every rank).
    ``taken`` is the number of batches handed out (= steps finished once the iteration ended);
    other attributes (``skipped``, ``set_epoch``, ``len()``) are the loader's."""

    def __init__(self, loader: Any, stop: GracefulStop) -> None:
        self.loader, self.stop, self.taken = loader, stop, 0

    def __iter__(self) -> Iterator[Any]:
        self.taken = 0
        it = None  # made after the first check: a stopped run starts no DataLoader workers
        while not self.stop.agreed(communicate=self.taken % AGREE_EVERY == 0):
            if it is None:
                it = iter(self.loader)
            try:
                batch = next(it)
            except StopIteration:
                return
            self.taken += 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def stop_message(
    signal_name: str,
    *,
    epoch: int | None,
    step: int,
    written: bool,
    checkpoint: str | Path | None,
    checkpoint_epoch: int = 0,
    explicit_resume: str | None = None,
    requeued: str | None = None,
    run_dir_given: bool = True,
) -> str:
    """The one line a stopped run logs. ``epoch`` is 1-based, ``step`` the steps finished in it;
    ``written``: the checkpoint was written at this stop (after a whole epoch); else the partial
    epoch is dropped and ``checkpoint`` (after ``checkpoint_epoch`` epochs, or None) is what a
    resume continues from. ``epoch=None``: a task counted in steps (``step``: the run's steps so far).
    ``explicit_resume``: the run's ``trainer.resume``, which the same
    command would read again instead of a newer ``checkpoint``. ``requeued``: the SLURM job that
    :func:`requeue` put back in the queue (it resumes by itself). ``run_dir_given=False``: the command did
    not name its run_dir (the default is a new timestamped folder per command), so the hint names it."""
    line = _stop_message(signal_name, epoch=epoch, step=step, written=written, checkpoint=checkpoint,
                         checkpoint_epoch=checkpoint_epoch, explicit_resume=explicit_resume)
    if not run_dir_given and checkpoint is not None:
        line = line.replace("run the same command again", f"run the same command with run_dir={Path(checkpoint).parent}")
    return f"{line}; SLURM job {requeued} requeued: it resumes when it starts again" if requeued else line


def _stop_message(signal_name: str, *, epoch: int | None, step: int, written: bool, checkpoint: str | Path | None,
                  checkpoint_epoch: int, explicit_resume: str | None) -> str:
    head = f"stopped by {signal_name} at " + (f"epoch {epoch} step {step}" if epoch is not None else f"step {step}")
    if epoch is None:  # counted in steps: the checkpoint (if any) was written at this stop's step
        if checkpoint is None:
            again = "the same command starts the run over" if not explicit_resume else \
                f"the same command resumes from {explicit_resume} again"
            return f"{head}; no checkpoint was written ({again})"
        same = not explicit_resume or os.path.abspath(explicit_resume) == os.path.abspath(checkpoint)
        hint = "run the same command again" if same else f"run the same command with trainer.resume={checkpoint}"
        return f"{head}; {checkpoint} holds step {step} (resume: {hint})"
    if checkpoint is None:
        again = "the same command starts the run over" if not explicit_resume else \
            f"the same command resumes from {explicit_resume} again"
        return f"{head}; the partial epoch is dropped and no checkpoint was written ({again})"
    if explicit_resume and os.path.abspath(explicit_resume) != os.path.abspath(checkpoint):
        hint = f"run the same command with trainer.resume={checkpoint}"
    else:
        hint = "run the same command again"
    if written:
        return f"{head}; checkpoint written to {checkpoint} (resume: {hint})"
    return (f"{head}; the partial epoch is dropped; resume continues from epoch {checkpoint_epoch + 1} "
            f"with {checkpoint} ({hint})")


def requeue(signal_name: str | None) -> str | None:
    """After a stop on SIGUSR1 inside a SLURM job, ask SLURM to requeue it (``scontrol requeue
    $SLURM_JOB_ID``, as Lightning's SLURM plugin does); the job id when SLURM took it, else None. Only
    the global rank 0 asks (``RANK`` unset or 0)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else \
        os.environ.get("SLURM_JOB_ID")
    if signal_name != REQUEUE_SIGNAL or not job or os.environ.get("RANK", "0") != "0":
        return None
    import shutil
    import subprocess

    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    return job if done.returncode == 0 else None


def exit_process(status: int) -> None:
    """Exit with ``status``; under torchrun leave the process group first and exit at once (as
    ``distributed.shutdown`` does: gloo can abort at interpreter exit and turn the status into 134)."""
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        finally:
            os._exit(status)
    sys.exit(status)

"""``lbc-torchrun [torchrun options] [key=value ...]``: ``torchrun -m lbc.cli.train`` with one-line errors.

    lbc-torchrun --nproc_per_node=8 model=resnet50 data=imagenet data.root=/data/imagenet
    lbc-torchrun --nnodes=2 --nproc_per_node=8 --rdzv_endpoint=host:29500 -- experiment=...

Options before the first ``key=value`` (or before ``--``) go to torchrun, the rest to ``lbc-train``.
Whatever ends the ranks, the launcher prints one line ``error: ...`` on stderr, in place of torchrun's
report (a traceback and a table per rank):

- a bad torchrun option (``--nproc_per_node=abc``): exit status 2, nothing started;
- a config error the ranks found at start-up: the ranks leave their line in a folder the launcher names
  (``LBC_TORCHRUN_REPORTS``, see :func:`lbc.run.distributed.report`); it prints rank 0's, exit status 2;
- a rank killed by a signal (SIGKILL, the OOM killer, a segfault): which rank, which signal, and how to
  resume (the run directory's ``last.pt`` and its epoch), exit status 1;
- a rank that stopped answering (SIGSTOP, a hang): the others stop after ``LBC_DIST_TIMEOUT`` seconds
  (:func:`lbc.run.distributed.timeout`) with the line naming it, exit status 1;
- SIGTERM (or Ctrl-C) on a rank: every rank stops after the same step and saves what it can; the line is
  the run's stop line, exit status 143 (130), as for ``lbc-train``;
- SIGUSR1 to the launcher (SLURM's ``--signal=USR1@<seconds>``): passed on to every rank, which stop after the
  same step and write ``last.pt`` there (inside a SLURM job rank 0 requeues it); exit status 138;
- any other failure (a crash with its traceback, printed by the rank) is reported by torchrun as usual.

As torchrun does, ``OMP_NUM_THREADS`` is set to 1 for the ranks when it is unset and there is more than
one process per node (without torchrun's banner about it). ``lbc-torchrun --help`` says this and points at
``lbc-train --help`` and ``torchrun --help``; it starts nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HELP = """\
usage: lbc-torchrun [torchrun options] [--] [lbc-train flags] [key=value ...]

lbc-train on several processes or machines (DDP): torchrun -m lbc.cli.train, with a start-up error
as one line and exit status 2. The arguments before the first key=value (or before --) are
torchrun's options; the rest go to lbc-train (put lbc-train's flags, such as -m or --cfg job, after
--: before it, -m is torchrun's).

  lbc-torchrun --nproc_per_node=8 model=resnet50 data=imagenet data.root=/data/imagenet
  lbc-torchrun --standalone --nproc_per_node=2 trainer=smoke
  lbc-torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      -- experiment=table1/resnet50_lbc_2x4 data.root=/data/imagenet

A rank killed or stopped ends the run with one line naming it and how to resume; a rank that stops
answering ends it after LBC_DIST_TIMEOUT seconds (default 600).

More: lbc-train --help (the commands, config groups and options), torchrun --help (torchrun's own
options), docs/runs.md "Many GPUs" (the batch per process, lr scaling).
"""

_AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api",
                  "torch.distributed.elastic.multiprocessing.errors", "torch.distributed.elastic.multiprocessing.errors.error_handler",
                  "torch.distributed.run")


class _Quiet(logging.Filter):
    """torchrun's warnings and errors about failed children: the launcher's one line replaces them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, lbc-train overrides): split at ``--`` or at the first ``key=value``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    i = next((k for k, a in enumerate(argv) if not a.startswith("-") and "=" in a), len(argv))
    return argv[:i], argv[i:]


def _fail(message: str, status: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def parse(argv: list[str]) -> Any:
    """torchrun's arguments for ``argv``; a bad option or value is one line (exit 2), not argparse's usage
    or a traceback. Sets ``OMP_NUM_THREADS=1`` for the ranks as torchrun would, without its banner."""
    from torch.distributed.run import (
        config_from_args,
        determine_local_world_size,
        get_args_parser,
        parse_min_max_nnodes,
    )

    options, overrides = split_argv(argv)
    parser = get_args_parser()

    def refuse(message: str) -> None:  # argparse's error(): usage and exit 2, here one line
        _fail(f"{message} (see torchrun --help)", 2)

    parser.error = refuse  # type: ignore[method-assign]
    args = parser.parse_args([*options, "-m", "lbc.cli.train", *overrides])
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as e:
        _fail(f"--nproc_per_node={args.nproc_per_node}: {e}; use a number of processes, or gpu, cpu, auto "
              "(see torchrun --help)", 2)
    try:
        parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError) as e:
        _fail(f"--nnodes={args.nnodes}: {e}; use N or MIN:MAX (see torchrun --help)", 2)
    if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # what torchrun does, after a five-line banner
    try:  # torchrun's own checks of its options (--nnodes=MIN:MAX, --max-restarts, ...), before anything starts
        config_from_args(copy.copy(args))
    except (ValueError, AssertionError, RuntimeError) as e:
        _fail(f"{e} (see torchrun --help)", 2)
    return args


def _reports(folder: Path) -> dict[int, dict[str, Any]]:
    """What the ranks left (:func:`lbc.run.distributed.report`): rank -> {status, message, kind, time}."""
    found: dict[int, dict[str, Any]] = {}
    for path in folder.glob("rank*.json"):
        try:
            found[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _killed(ranks: list[int], signals: Mapping[int, int], run_dir: str | None) -> str:
    from lbc.run.lifecycle import resume_hint

    who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    how = " / ".join(sorted({_signal_name(signals[r]) for r in ranks}))
    return f"{who} killed by {how}; the other ranks were stopped; {resume_hint(run_dir)}"


def verdict(failures: Mapping[int, Any], folder: Path) -> tuple[str, int] | None:
    """(the one line, the exit status) for the ranks' ends: ``failures`` as torchrun's ChildFailedError has
    them (rank -> a failure with ``exitcode``, negative for a signal) and what the ranks reported in
    ``folder``; None when no rank said anything (a crash: torchrun's report, with the rank's traceback)."""
    reports = _reports(folder)
    errors = {r: x for r, x in reports.items() if x.get("kind") in ("error", "timeout")}
    config = sorted(r for r, x in errors.items() if x.get("status") == 2)
    if config:  # the same line on every rank: rank 0's
        return errors[config[0]]["message"], 2
    timeouts = sorted((x.get("time", 0), r) for r, x in errors.items() if x.get("kind") == "timeout")
    if timeouts:  # a rank stopped answering: torchrun killed it afterwards (SIGTERM, then SIGKILL), not the cause
        first = errors[timeouts[0][1]]
        return first["message"], int(first.get("status", 1))
    run_file = folder / "run_dir"
    run_dir = run_file.read_text().strip() if run_file.is_file() else None
    signalled = {r: -f.exitcode for r, f in failures.items() if getattr(f, "exitcode", 0) < 0}
    # torchrun itself ends the other ranks with SIGTERM once one failed: those deaths are not the cause
    killed = sorted(r for r, n in signalled.items() if n != signal.SIGTERM)
    if killed:
        return _killed(killed, signalled, run_dir), 1
    if any(getattr(f, "exitcode", 0) > 0 and r not in reports for r, f in failures.items()):
        return None  # a rank crashed (it printed its traceback): the others' lines are only the consequence
    if errors:  # the first rank that failed says why (a lost rank, a data error, a diverged loss)
        first = min(errors, key=lambda r: (errors[r].get("time", 0), r))
        return errors[first]["message"], int(errors[first].get("status", 1))
    stops = {r: x for r, x in reports.items() if x.get("kind") == "stop"}
    if stops:  # SIGTERM / Ctrl-C: every rank stopped after the same step; rank 0's stop line
        chosen = stops[min(stops)]
        return chosen["message"], int(chosen.get("status", 143))
    if signalled:  # SIGTERM before any handler was in place (while importing)
        return _killed(sorted(signalled), signalled, run_dir), 1
    return None


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (torchrun's ranks), from Linux's /proc; [] where it has none."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


def _pass_to_ranks(signum: int, frame: Any) -> None:
    """SIGUSR1 to the launcher goes on to every rank (torchrun would die of it and leave them running):
    they stop after the same step, write last.pt there and, inside a SLURM job, requeue it."""
    for pid in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def main(argv: list[str] | None = None) -> None:
    """The ``lbc-torchrun`` console script (``-h``/``--help`` anywhere: what it is, nothing started)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(HELP, end="", flush=True)
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    from lbc.run.distributed import REPORTS_ENV

    for name in _AGENT_LOGGERS:
        logging.getLogger(name).addFilter(_Quiet())
    args = parse(argv)
    signal.signal(signal.SIGUSR1, _pass_to_ranks)  # SLURM's --signal=USR1@<s>: the ranks save (and requeue)
    with tempfile.TemporaryDirectory(prefix="lbc-torchrun-") as folder:
        os.environ[REPORTS_ENV] = folder  # the ranks inherit it
        try:
            run(args)
        except ChildFailedError as e:
            said = verdict(e.failures, Path(folder))
            if said is None:
                raise
            line, status = said
        else:
            return
        finally:
            os.environ.pop(REPORTS_ENV, None)
    _fail(line, status)


if __name__ == "__main__":
    main()

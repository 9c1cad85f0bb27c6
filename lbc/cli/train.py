"""``lbc-train [key=value ...]``: train as the Hydra config says (``python tools/train.py`` is the same).

The configs ship inside the package (``lbc/configs``), so this works from any directory; add your
own config directory with Hydra's ``--config-dir DIR`` (its files extend or replace ours).
A bad value stops with one line ``error: <key> ...`` on stderr and exit status 2, whether Hydra
finds it while composing (an unknown key, a wrong type, a missing option) or our checks do.
Under ``torchrun --nproc_per_node=K`` it trains with DDP.

``lbc-train --help`` (``lbc/cli/help.py``) lists the commands, flags and every group's options, read
from ``lbc/configs``; it is answered before torch and Hydra are imported (they are imported in the
functions that use them), so it prints at once.

Which function runs the job is config: ``task.runner`` (``task=classification``, the default:
``lbc.engine.trainer.run``; ``task=detection``: ``lbc.detection.runner.run``, MMDetection;
``task=lm``: ``lbc.lm.runner.run``, causal language models through transformers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lbc.cli import help as cli_help
from lbc.errors import ConfigError, DataError, WriteError
from lbc.run import rundir, signals

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra, OmegaConf, lbc.config and lbc.run.distributed (torch) are imported where they are used: not for --help

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def fail(message: str, status: int = 2) -> None:
    """Print ``error: <message>`` as one line on stderr (rank 0 only; under ``lbc-torchrun`` every rank leaves
    it to the launcher, which prints one) and exit with ``status``."""
    from lbc.run import distributed

    line = " ".join(message.split())
    reported = distributed.report(status, line)  # under lbc-torchrun the launcher prints the one line
    if not reported and distributed.rank() == 0 and os.environ.get("RANK", "0") == "0":
        print(f"error: {line}", file=sys.stderr, flush=True)
    signals.exit_process(status)  # sys.exit; under torchrun, leave the process group first


class _HydraRaises:
    """Makes Hydra raise its typed errors while it composes, instead of printing them and exiting with 1.

    Hydra reads ``HYDRA_FULL_ERROR=1`` when an error reaches it (``hydra/_internal/utils.py``,
    ``run_and_report``). It is set while Hydra composes (before a job, and before each job of a
    sweep); while a job runs, and once ``main`` is done, the user's own setting is back, so a crash
    inside a job is reported as Hydra always reports it.
    """

    KEY = "HYDRA_FULL_ERROR"

    def __init__(self) -> None:
        self.user = os.environ.get(self.KEY)
        self.in_job = False

    def __enter__(self) -> _HydraRaises:
        os.environ[self.KEY] = "1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Around one job: the user's setting; Hydra raises again once the job has returned (a job that
        raises leaves it so: Hydra reports that error as usual, and ``main`` knows it came from a job)."""
        self.in_job = True
        self._restore()
        yield
        self.in_job = False
        os.environ[self.KEY] = "1"

    def _restore(self) -> None:
        if self.user is None:
            os.environ.pop(self.KEY, None)
        else:
            os.environ[self.KEY] = self.user


def _overrides(argv: list[str]) -> list[str]:
    """The command line's overrides, parsed by Hydra's own argument parser; a bad flag is a ConfigError."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

    parser = get_args_parser()
    parser.error = _bad_flag  # type: ignore[method-assign]  # argparse would print its usage and exit
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise ConfigError(f"{' '.join(extra)}: not a flag of lbc-train (see --help), or key=value overrides on "
                          "both sides of a flag (put the flags first)")
    return args.overrides


def _bad_flag(message: str) -> NoReturn:
    raise ConfigError(message)


def run_job(cfg: DictConfig) -> None:
    """One job: Hydra's output directory becomes ``run_dir``; errors are one line. After a failed start
    (a config or data error, an interrupt before training) the folder goes if nothing of a run is in it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from lbc import config as lbc_config
    from lbc.run import distributed
    from lbc.run.lifecycle import resume_hint

    out = HydraConfig.get().runtime.output_dir
    _job_dirs.append(out)
    with open_dict(cfg):
        cfg.run_dir = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    try:
        runner(cfg)(cfg)
    except signals.Stopped as e:  # SIGTERM / first Ctrl-C: the run saved what it could and logged one line
        distributed.report(e.exit_code, str(e), kind="stop")  # under lbc-torchrun: for the launcher's line
        signals.exit_process(e.exit_code)
    except FloatingPointError as e:  # diverged: nothing diverged was saved; say what the run dir holds
        fail(f"{e} ({diverged_hint(cfg)})", 1)
    except WriteError as e:  # a full disk (quota, read-only) while saving: the previous file is intact
        fail(str(e), 1)
    except (ConfigError, DataError, OmegaConfBaseException, KeyboardInterrupt) as e:
        rundir.remove_if_unused(out)  # a run that failed at start-up leaves no folder with only .hydra/ in it
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM before training started (the loop stops gracefully)
            _interrupted(e)
        fail(str(lbc_config.as_config_error(e)) if isinstance(e, OmegaConfBaseException) else str(e))
    except Exception as e:  # a collective that timed out or lost a rank: one line, then out at once
        if not distributed.is_link_failure(e):
            raise
        line, prints = distributed.link_failure_line(e)
        line = f"{line}; {resume_hint(cfg.run_dir)}"
        if not distributed.report(1, line, "timeout" if distributed.timed_out(e) else "error") and prints:
            print(f"error: {line}", file=sys.stderr, flush=True)
        distributed.exit_now(1)  # leaving the group would wait for the rank that does not answer


def diverged_hint(cfg: DictConfig) -> str:
    """After a diverged run: the checkpoint a rerun continues from (``<run_dir>/last.pt`` and its epoch), or
    that none was written, and what to change (trainer.clip_grad may change on resume; optim.lr may not)."""
    from omegaconf import OmegaConf

    from lbc.run.lifecycle import last_checkpoint

    found = last_checkpoint(cfg.run_dir)
    resume = OmegaConf.select(cfg, "trainer.resume", default=None, throw_on_missing=False)
    if found is None:
        again = f"it resumes from {resume} again" if resume else "it starts over"
        return (f"no checkpoint was written in {cfg.run_dir}: lower optim.lr or set trainer.clip_grad and run "
                f"again ({again})")
    path, holds = found
    return (f"the last good checkpoint is {path}" + (f" ({holds})" if holds else "") + ": set trainer.clip_grad "
            "and run again to resume from it, or lower optim.lr with a new run_dir")


def runner(cfg: DictConfig) -> Callable[[DictConfig], Any]:
    """The function that runs this job: ``task.runner`` (``lbc.engine.trainer.run`` for classification,
    ``lbc.detection.runner.run`` for detection), imported here (importing an engine takes a second)."""
    from hydra.utils import get_method

    path = cfg.task.runner
    quiet = logging.getLogger("hydra.utils")  # it logs a failed lookup on the console; ours is the one line
    was = quiet.disabled
    quiet.disabled = True
    try:
        return get_method(path)
    except Exception as e:  # noqa: BLE001  (Hydra wraps the import error; its cause says what is missing)
        cause = e.__cause__ or e
        missing = getattr(cause, "name", None) if isinstance(cause, ImportError) else None
        hint = {"mmdet": "; task=detection needs the detection extra: pip install -e '.[det]'",
                "mmengine": "; task=detection needs the detection extra: pip install -e '.[det]'",
                "mmcv": "; task=detection needs the detection extra: pip install -e '.[det]'",
                "transformers": "; task=lm needs the language-model extra: pip install -e '.[lm]'",
                "tokenizers": "; task=lm needs the language-model extra: pip install -e '.[lm]'"}.get(
                    (missing or "").split(".")[0], "")
        raise ConfigError(f"task.runner={path} cannot be loaded: {' '.join(str(cause).split())}{hint}") from None
    finally:
        quiet.disabled = was


_job_dirs: list[str] = []  # Hydra's output directories of this process's jobs (cleaned after a failed start)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 outside the training loop (start-up): handled like a Ctrl-C there, with its own
    exit status (128 + the signal)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signal_name, self.exit_code = signal.Signals(signum).name, 128 + signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


def _interrupted(err: KeyboardInterrupt) -> None:
    name, status = (err.signal_name, err.exit_code) if isinstance(err, _Terminated) else ("SIGINT", 130)
    fail(f"stopped by {name} before training started; nothing was written (run the same command again)", status)


def _hydra_main(task: Callable[[DictConfig], None], argv: list[str]) -> None:
    """What ``@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")`` runs, on ``argv``
    instead of ``sys.argv`` (Hydra's decorator parses ``sys.argv`` and has no other input)."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser

    version.setbase("1.3")
    parser = get_args_parser()
    _run_hydra(args=parser.parse_args(argv), args_parser=parser, task_function=task, config_path=CONFIGS,
               config_name="train")


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lbc-train`` console script, on ``argv`` (its arguments; None: ``sys.argv[1:]``).

    Exits through ``SystemExit`` with the run's status, as the console script does; scripts call it
    with their arguments instead of editing ``sys.argv``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if cli_help.wants_help(argv):  # ours, not Hydra's: fast, and it lists only what a user can choose
        cli_help.print_help(argv)
        return
    from lbc import config as lbc_config
    from lbc.run import distributed

    try:
        rundir.check_argv(argv)  # run_dir='' and the like: refused before Hydra creates anything there
        overrides = _overrides(argv)
    except ConfigError as e:
        fail(str(e))
    except OSError as e:  # a run_dir the system cannot look at (a symlink loop, ...)
        fail(f"run_dir={rundir.short(os.fsdecode(e.filename or ''))}: {e.strerror or e}; pick another run_dir")
    main_thread = threading.current_thread() is threading.main_thread()
    early = (signal.SIGTERM, signal.SIGUSR1)  # before the loop's own handlers (SLURM's USR1 would kill)
    previous = {s: signal.signal(s, _raise_terminated) for s in early} if main_thread else {}
    raising = _HydraRaises()

    def task(cfg: DictConfig) -> None:
        with raising.job():
            run_job(cfg)

    try:
        with raising:
            _hydra_main(task, argv)
    except BrokenPipeError:  # `lbc-train --cfg job | head`: the reader left; not an error of the config
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        signals.exit_process(0)
    except Exception as e:  # noqa: BLE001  (before a job starts, an error is about the command line or config)
        if raising.in_job or raising.user == "1":  # a job's own error, or the user asked for Hydra's full trace
            raise
        if isinstance(e, OSError) and e.filename is not None:  # Hydra could not make the job's directory
            fail(f"run_dir={rundir.short(os.fsdecode(e.filename))} cannot be created: {e.strerror or e}; "
                 "pick another run_dir")
        fail(str(lbc_config.as_config_error(e, overrides)))  # Hydra could not compose: no job has started
    except KeyboardInterrupt as e:  # while Hydra composes or starts the job
        for out in _job_dirs:
            rundir.remove_if_unused(out)
        _interrupted(e)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    distributed.shutdown()  # under torchrun: leave the group and os._exit(0) (gloo can abort at exit)


if __name__ == "__main__":
    main()

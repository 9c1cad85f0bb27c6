"""The run lifecycle every task goes through, written once: :class:`Run`.

A task's runner (classification: :mod:`lbc.engine.trainer`; detection: :mod:`lbc.detection.runner`)
builds and trains what is its own and calls these steps, top to bottom::

    run = Run.claim(cfg)                        # the ranks share rank 0's run_dir; rank 0 checks and locks it
    with run:                                   # closing gives it back; a failed start leaves nothing behind
        ...                                     # the task builds (and checks a resume)
        run.begin(device, "3 epochs x 10 steps", resumed_from=ckpt, resumed_epoch=2)
        with run.stop:                          # SIGTERM / a first Ctrl-C only ask (signals.GracefulStop)
            ...                                 # the task trains: run.started = True after its first step,
            run.evaluated({...}, total)         # one record per evaluation (lbc.run.records: the schema)
                                                # and its progress line, built from what was written,
            raise run.stopped(epoch=..., ...)   # and on a stop the one line and signals.Stopped
        return run.done("top-1 55.00%", result) # the done line; every rank waits for the others

What a new task supplies: its build and train, its records (the progress line of each is
:func:`lbc.run.records.progress_line`'s, the same for every task), the schedule phrase of the start line
and the headline of the done line (its metrics in a few words).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lbc.io import atomic_write
from lbc.run import distributed, rundir
from lbc.run.records import MetricsRecord, progress_line
from lbc.run.signals import GracefulStop, Stopped, requeue, stop_message

log = logging.getLogger("lbc")

CONFIG_FILE = "config.yaml"  # the resolved config of the run, in its run directory

__all__ = ["CONFIG_FILE", "Run", "done_line", "last_checkpoint", "resume_hint", "start_line", "write_hydra_record"]


def start_line(cfg: DictConfig, device: Any, schedule: str, resumed_from: str | Path | None = None,
               resumed_epoch: int | None = None, resumed_epoch_step: int = 0) -> str:
    """``lbc: <model> on <data>, sparsity <method>, <device>, <K> process(es), <schedule>[, resuming from
    <ckpt> at epoch <n>]; run dir <run_dir>``: what a run logs when it begins (``at epoch <n+1> step <k>``
    for a checkpoint written ``resumed_epoch_step`` steps into the epoch after ``resumed_epoch``)."""
    where = ""
    if resumed_from:
        at = "" if resumed_epoch is None else f" at epoch {resumed_epoch}" if not resumed_epoch_step else \
            f" at epoch {resumed_epoch + 1} step {resumed_epoch_step}"
        where = f", resuming from {resumed_from}{at}"
    return (f"lbc: {cfg.model.name} on {cfg.data.name}, sparsity {cfg.sparsity.method}, {device}, "
            f"{distributed.world_size()} process(es), {schedule}{where}; run dir {cfg.run_dir}")


def done_line(headline: str, result: Mapping[str, Any]) -> str:
    """``done: <headline>  |  sparsity: <name> <value> ...  |  run dir: <run_dir>``: what a finished run logs."""
    scalars = "  ".join(f"{k.removeprefix('sparsity/')} {v:.4f}" for k, v in result.items() if k.startswith("sparsity/"))
    return f"done: {headline}  |  sparsity: {scalars or 'n/a'}  |  run dir: {result['run_dir']}"


def run_dir_on_command_line(run_dir: str | Path) -> bool:
    """Whether the ``lbc-train`` job that made ``run_dir`` named it on its command line (True outside such a
    job: a test or a script passes its own config). Without it the same command makes a new timestamped
    run dir, so a resume hint must name the directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return True
        hydra_cfg = HydraConfig.instance().cfg
        out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None, throw_on_missing=False)
        if not isinstance(out, str) or os.path.realpath(out) != os.path.realpath(run_dir):
            return True  # another job's Hydra state (in-process callers): not this run's command
        task = OmegaConf.select(hydra_cfg, "hydra.overrides.task", default=[]) or []
    except Exception:  # noqa: BLE001
        return True
    return any(str(o).lstrip("+~").split("=", 1)[0] in ("run_dir", "hydra.run.dir") for o in task)


def write_hydra_record(run_dir: Path, cfg: DictConfig) -> list[Path]:
    """``<run_dir>/.hydra/``: ``config.yaml`` (the job's config, interpolations kept), ``hydra.yaml`` and
    ``overrides.yaml`` (the command line's overrides), as Hydra writes them when ``hydra.output_subdir`` is
    set. lbc sets it to null (``train.yaml``): Hydra would write them before any check, so a refused run
    would rewrite an existing run's record; :meth:`Run.begin` writes them, once the run is accepted.

    Only for the directory Hydra made for this job (``hydra.runtime.output_dir``); nothing outside
    ``lbc-train`` (a config composed in a test or a script has no job). Returns the files written.
    """
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return []
        hydra_cfg = HydraConfig.instance().cfg
        out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None, throw_on_missing=False)
        overrides = OmegaConf.select(hydra_cfg, "hydra.overrides.task", default=[], throw_on_missing=False)
    except Exception:  # noqa: BLE001  (no Hydra job: nothing of Hydra's to record)
        return []
    if not isinstance(out, str) or os.path.realpath(out) != os.path.realpath(run_dir):
        return []
    folder = Path(run_dir) / rundir.HYDRA_DIR
    folder.mkdir(exist_ok=True)
    written = []
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", overrides)):
        text = OmegaConf.to_yaml(node)
        atomic_write(folder / name, lambda tmp, text=text: tmp.write_text(text))
        written.append(folder / name)
    return written


def last_checkpoint(run_dir: str | Path) -> tuple[Path, str | None] | None:
    """``<run_dir>/last.pt`` and what it holds in words (``epoch 3``, ``step 40``; None if unreadable), or
    None when there is no such file. Cheap: the file is memory-mapped, no tensor is read."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        return None
    try:
        import torch

        from lbc import io

        with torch.serialization.safe_globals(list(getattr(io, "SAFE_GLOBALS", []))):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (a torn or foreign file: the resume says what is wrong with it)
        return path, None
    if not isinstance(ckpt, dict):
        return path, None
    epoch, step, inside = ckpt.get("epoch"), ckpt.get("step"), ckpt.get("epoch_step")
    if "hf_config" in ckpt and isinstance(step, int):  # a language model's: counted in steps
        return path, f"step {step}"
    if isinstance(epoch, int):
        part = f" and {inside} step(s) of epoch {epoch + 1}" if isinstance(inside, int) and inside > 0 else ""
        return path, f"epoch {epoch}{part}"
    return path, f"step {step}" if isinstance(step, int) else None


def resume_hint(run_dir: str | Path | None) -> str:
    """How to go on after a run was stopped from outside (a rank killed, a collective timed out): the
    checkpoint ``run_dir`` holds (:func:`last_checkpoint`) and the command that continues from it."""
    if run_dir is None:
        return "no run directory was claimed yet: run the same command again"
    found = last_checkpoint(run_dir)
    if found is None:
        return f"no checkpoint was written in {run_dir}: the same command with run_dir={run_dir} starts over"
    path, holds = found
    return f"resume: the same command with run_dir={run_dir} continues from {path}" + (f" ({holds})" if holds else "")


class Run:
    """One training run in its claimed run directory (rank 0 holds ``<run_dir>/.lock`` until :meth:`close`).

    ``stop`` is the run's :class:`~lbc.run.signals.GracefulStop` (enter it around training); ``record``
    its metrics writer (rank 0; open from :meth:`begin`); ``started``: the task sets it once a training
    step has finished, so that a failure before it counts as a failed start.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, lock: rundir.RunDirLock | None) -> None:
        self.cfg, self.run_dir, self.lock = cfg, run_dir, lock
        self.is_main = distributed.is_main()
        self.stop = GracefulStop()
        self.record = MetricsRecord(run_dir, enabled=False)
        self.started = False
        self._found = {p.name for p in run_dir.iterdir()} if self.is_main and run_dir.is_dir() else set()

    @classmethod
    def claim(cls, cfg: DictConfig) -> Run:
        """Take ``cfg.run_dir`` for this run (collective under torchrun, after ``distributed.init``): every
        rank uses rank 0's directory (written back into ``cfg.run_dir``), which rank 0 checks and locks;
        a directory that is unusable or held by a live run is one ConfigError line on every rank."""
        run_dir = Path(rundir.share(str(cfg.run_dir)))
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        run = cls(cfg, run_dir, rundir.claim(run_dir))
        distributed.note_run_dir(run_dir)  # under lbc-torchrun: for the launcher's resume hint
        return run

    def begin(self, device: Any, schedule: str, *, resumed_from: str | Path | None = None,
              resumed_epoch: int | None = 0, resumed_step: int | None = None, resumed_epoch_step: int = 0,
              tensorboard: bool = False) -> None:
        """The run begins (rank 0 writes): ``config.yaml`` (resolved), Hydra's ``.hydra/`` record
        (:func:`write_hydra_record`), ``train.log`` opened (:func:`~lbc.run.rundir.open_run_log`; nothing of
        this run is in the directory before this point), the metrics record opened with the
        records after ``resumed_epoch`` dropped (written after the checkpoint resumed from; None: unknown,
        keep them; ``resumed_step``: by step instead, for checkpoints inside an epoch, ``resumed_epoch_step`` steps
        into the next epoch), the start line.
        ``tensorboard``: the record writes TensorBoard events too."""
        self.record = MetricsRecord(self.run_dir, enabled=self.is_main, tensorboard=tensorboard)
        if not self.is_main:
            rundir.drop_run_log()  # rank 0 alone writes train.log
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(self.cfg, resolve=True)
        atomic_write(self.run_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))
        write_hydra_record(self.run_dir, self.cfg)
        rundir.open_run_log(self.run_dir)  # train.log: the records since start-up, then the run's
        if resumed_step is not None:
            self.record.truncate_after(None, step=resumed_step)
        elif resumed_epoch is not None:
            self.record.truncate_after(resumed_epoch)
        log.info("%s", start_line(self.cfg, device, schedule, resumed_from, resumed_epoch, resumed_epoch_step))

    def evaluated(self, record: Mapping[str, Any], total: int, unit: str = "epoch") -> dict[str, Any]:
        """Append one evaluation's ``record`` to ``metrics.jsonl`` and log its progress line (rank 0), built from
        the record as written (:func:`~lbc.run.records.progress_line`: ``epoch 3/15: loss ...``; ``unit`` and
        ``total``: ``epoch`` of the run's epochs, or ``step`` of its steps). Returns the record as written."""
        written = self.record.append(record)
        if self.is_main:
            log.info("%s", progress_line(written, total, unit))
        return written

    def stopped(self, *, epoch: int | None, step: int, written: bool, checkpoint: str | Path | None,
                checkpoint_epoch: int = 0, explicit_resume: str | None = None) -> Stopped:
        """The :class:`~lbc.run.signals.Stopped` to raise after a stop at ``epoch`` (1-based) ``step``, its
        one line logged (rank 0): see :func:`~lbc.run.signals.stop_message` for the arguments."""
        name = self.stop.requested or "SIGTERM"
        requeued = requeue(name) if written else None  # SIGUSR1 in a SLURM job: back in the queue, it resumes
        message = stop_message(name, epoch=epoch, step=step, written=written, checkpoint=checkpoint,
                               checkpoint_epoch=checkpoint_epoch, explicit_resume=explicit_resume, requeued=requeued,
                               run_dir_given=run_dir_on_command_line(self.run_dir))
        if self.is_main:
            log.info("%s", message)
        self.record.close()
        return Stopped(message, name, self.stop.exit_code or 143)

    def done(self, headline: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """``result`` with ``run_dir``, after the done line (rank 0, ``headline``: the task's final metrics
        in a few words; the ``sparsity/<name>`` entries follow it); every rank waits for the others."""
        out = {**result, "run_dir": str(self.run_dir)}
        self.record.close()
        if self.is_main:
            log.info("%s", done_line(headline, out))
        distributed.barrier()
        return out

    def close(self, error: BaseException | None = None) -> None:
        """Give the run directory back (twice: a no-op). After ``error`` before :attr:`started` (a failed
        start; a stop is not one), rank 0 first removes what this run added to the directory (config.yaml,
        logs, events), so that ``lbc-train`` can remove a directory that holds nothing else
        (:func:`~lbc.run.rundir.remove_if_unused`)."""
        if error is not None and not isinstance(error, Stopped) and not self.started and self.is_main:
            self._remove_added()
        self.record.close()
        if self.lock is not None:
            self.lock.release()

    def _remove_added(self) -> None:
        if not self.run_dir.is_dir():
            return
        for p in self.run_dir.iterdir():
            if p.name in self._found or p.name in rundir.BOOKKEEPING:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self.close(error)

    def __repr__(self) -> str:
        return f"Run({str(self.run_dir)!r}, started={self.started})"

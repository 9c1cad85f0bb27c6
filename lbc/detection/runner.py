"""``task=detection``: one MMDetection training run driven by the Hydra config (``lbc-train task=detection``).

:func:`run` checks the config and the data first (one-line errors, nothing built), takes the run directory
as classification does (``lbc.engine.rundir``: one run at a time), writes the resolved config to
``<run_dir>/config.yaml``, turns the config into mmengine's (:func:`lbc.detection.config.to_mmengine`),
and lets mmengine's ``Runner`` train: its logs and config dump go to ``<run_dir>/<timestamp>/``
(TensorBoard events under ``vis_data/``), its checkpoints to ``<run_dir>/epoch_<n>.pth`` (named by
``<run_dir>/last_checkpoint``), and lbc's ``SparsityHook`` appends one line per evaluation to
``<run_dir>/metrics.jsonl``. It ends with one line ``done: bbox mAP ... | sparsity: ... | run dir: ...``.

Running the same command (the same run_dir) again resumes from the last checkpoint, after checking
that the config changed only in ways a resume can honour. SIGTERM or a first Ctrl-C stop the run at
the next iteration (after the current epoch's checkpoint is written, if the epoch just ended): a
partial epoch is dropped, one line says what a resume continues from, and the exit status is 143/130.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lbc import config as lbc_config
from lbc.detection.config import checkpoint_in, data_root, resolve_mmdet_config, to_mmengine
from lbc.detection.shapes import check_coco_root, make_shapes_coco
from lbc.engine import distributed, rundir, signals
from lbc.errors import ConfigError

log = logging.getLogger("lbc")

__all__ = ["prepare_data", "run"]

# Config keys a resumed detection run may change (besides what lbc.engine.checkpoint ignores anyway):
# where the data is and how it is read, evaluation, logging and checkpoint cadence, the device.
RESUME_ALLOWED = ("data.root", "data.num_workers", "data.val_batch_size", "trainer.val_interval",
                  "trainer.log_interval", "trainer.checkpoint_interval", "trainer.max_keep_checkpoints",
                  "trainer.progress", "trainer.device")
METRICS = ("bbox_mAP", "segm_mAP")


# --- before anything is built -------------------------------------------------------------------


def prepare_data(data: Any) -> Path:
    """The data root, checked (one line naming a missing root / annotation file / image folder); the
    shapes set is generated there first when it is not (idempotent, locked: every rank may call it)."""
    root = data_root(data)
    if hasattr(data, "train_images"):  # the generated shapes set
        try:
            make_shapes_coco(root, train_images=data.train_images, val_images=data.val_images,
                             image_size=data.image_size, max_objects=data.max_objects, seed=data.seed)
        except OSError as e:
            raise ConfigError(f"data.root={root}: cannot write the shapes data set there: {e.strerror or e}") from None
    check_coco_root(root)
    return root


def _select_device(trainer: Any) -> Any:
    """Make mmengine use ``trainer.device``; returns the torch device. mmengine picks CUDA whenever torch
    sees it (``mmengine.device`` decides at import), so ``cpu`` hides the GPUs before mmengine is imported."""
    if trainer.device == "cpu" and "mmengine.device" not in sys.modules:
        import torch

        if not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
    device = distributed.pick_device(trainer.device)  # cuda without a GPU: one line; cuda:LOCAL_RANK under torchrun
    from mmengine.device import get_device

    if get_device() != device.type:
        raise ConfigError(f"trainer.device={trainer.device}: mmengine was already set up for {get_device()} in "
                          f"this process; start a new process (or set CUDA_VISIBLE_DEVICES='')")
    if trainer.amp and device.type != "cuda":
        raise ConfigError("trainer.amp=true needs a CUDA device (mmengine's AmpOptimWrapper); "
                          "use trainer.amp=false on CPU")
    return device


def _check_inputs(typed: Mapping[str, Any]) -> None:
    model = typed["model"]
    resolve_mmdet_config(model.mmdet_config)
    if model.backbone_init != "random":
        path = Path(os.path.expanduser(model.backbone_init))
        if not path.is_file():
            raise ConfigError(f"model.backbone_init={model.backbone_init}: no such file (use random, or the path "
                              "of a checkpoint converted with tools/convert_backbone.py)")


def _check_resume(run_dir: Path, current: dict[str, Any]) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), after refusing in one line a config
    change a resume cannot honour (the run dir's config.yaml against this run's)."""
    from lbc.engine.checkpoint import compare_config, resume_policy

    ckpt = checkpoint_in(run_dir)
    saved_file = run_dir / "config.yaml"
    if ckpt is None or not saved_file.is_file():
        return ckpt
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    changed = [k for k in compare_config(saved, current)
               if not any(k == a or k.startswith(f"{a}.") for a in RESUME_ALLOWED)]
    resume_policy(changed, saved, current, key="run_dir", path=ckpt)
    return ckpt


# --- while mmengine runs -------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside mmengine's loop to stop on a signal (caught by :func:`run`)."""

    def __init__(self, epoch: int, step: int, written: bool) -> None:
        super().__init__(f"stop at epoch {epoch} step {step}")
        self.epoch, self.step, self.written = epoch, step, written


def _control_hook(stop: signals.GracefulStop) -> Any:
    """A hook (lowest priority: after the checkpoint hook) that stops on a signal between iterations,
    notes that training has started, and keeps the last validation's metrics."""
    from mmengine.hooks import Hook

    class _Control(Hook):
        priority = "LOWEST"

        def __init__(self) -> None:
            self.looping = False  # the train loop began (a resume, if any, has loaded)
            self.started = False  # a training iteration finished
            self.metrics: dict[str, Any] | None = None
            self._epoch_done = False

        def _asked(self, runner: Any, last: bool) -> bool:
            every = (runner.iter + 1) % signals.AGREE_EVERY == 0  # under torchrun: ask the other ranks now and then
            return stop.agreed(communicate=every or last)

        def before_train(self, runner: Any) -> None:
            self.looping = True

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
            self.started = True
            last = batch_idx + 1 == len(runner.train_dataloader)
            if self._asked(runner, last):
                if not last:
                    raise _Stop(runner.epoch + 1, batch_idx + 1, written=False)
                self._epoch_done = True  # the epoch is whole: let the checkpoint hook save it first

        def after_train_epoch(self, runner: Any) -> None:
            if self._epoch_done or stop.agreed():
                raise _Stop(runner.epoch + 1, len(runner.train_dataloader), written=True)

        def after_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
            if self._asked(runner, False):  # the epoch's checkpoint was written before validation
                raise _Stop(runner.epoch, len(runner.train_dataloader), written=True)

        def after_val_epoch(self, runner: Any, metrics: dict[str, Any] | None = None) -> None:
            self.metrics = dict(metrics or {})

    return _Control()


def _epoch_of(checkpoint: Path | None) -> int:
    match = re.fullmatch(r"epoch_(\d+)\.pth", checkpoint.name) if checkpoint else None
    return int(match.group(1)) if match else 0


def _stopped(stop: signals.GracefulStop, err: _Stop, run_dir: Path) -> signals.Stopped:
    ckpt = checkpoint_in(run_dir)
    at = _epoch_of(ckpt)
    message = signals.stop_message(stop.requested or "SIGTERM", epoch=err.epoch, step=err.step,
                                   written=err.written and at == err.epoch, checkpoint=ckpt, checkpoint_epoch=at)
    if distributed.is_main():
        log.info("%s", message)
    return signals.Stopped(message, stop.requested or "SIGTERM", stop.exit_code or 143)


@contextlib.contextmanager
def _cleanup_failed_start(run_dir: Path, started: Any) -> Iterator[None]:
    """If the run fails before its first training iteration, remove what it added to ``run_dir``
    (mmengine's log folder, config.yaml): the CLI then removes the run dir if nothing else is in it."""
    before = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    try:
        yield
    except BaseException:
        if distributed.is_main() and not started() and run_dir.is_dir():
            for p in run_dir.iterdir():
                if p.name not in before and p.name not in rundir.BOOKKEEPING:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        raise


class _Discard:
    """A stdout that writes nothing (``trainer.progress=false``)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _console(progress: bool) -> contextlib.AbstractContextManager[Any]:
    """``trainer.progress=false``: what mmengine and pycocotools print to stdout is dropped (mmengine's log
    file in the run dir keeps all of it); lbc's own lines (start, done, a stop) still reach the console."""
    return contextlib.nullcontext() if progress else contextlib.redirect_stdout(_Discard())


# --- the result ------------------------------------------------------------------------------------


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last line of ``<run_dir>/metrics.jsonl`` (a finished run that was resumed validates nothing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _result(metrics: Mapping[str, Any], scalars: Mapping[str, float], run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in METRICS:
        value = metrics.get(f"coco/{name}", metrics.get(name))
        if value is not None:
            out[f"coco/{name}"] = float(value)
    out |= {f"sparsity/{k}": float(v) for k, v in scalars.items()}
    out["run_dir"] = str(run_dir)
    return out


def _done_line(result: Mapping[str, Any]) -> str:
    maps = "  ".join(f"{name.split('_')[0]} mAP {result[f'coco/{name}']:.3f}" for name in METRICS
                     if f"coco/{name}" in result) or "mAP n/a"
    scalars = "  ".join(f"{k.removeprefix('sparsity/')} {v:.4f}" for k, v in result.items() if k.startswith("sparsity/"))
    return f"done: {maps}  |  sparsity: {scalars or 'n/a'}  |  run dir: {result['run_dir']}"


# --- the run -------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the detector ``cfg`` describes with mmengine's Runner; returns the final metrics
    (``coco/bbox_mAP``, ``coco/segm_mAP`` for Mask R-CNN, ``sparsity/<scalar>``, ``run_dir``)."""
    typed = lbc_config.validate(cfg)
    device = _select_device(typed["trainer"])
    distributed.init(device)  # under torchrun: the process group (mmengine then uses it), before the run dir is shared
    from lbc.engine.trainer import share_run_dir

    run_dir = Path(share_run_dir(str(cfg.run_dir)))
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    _check_inputs(typed)
    mm = to_mmengine(cfg, typed)  # model.cfg_options and the groups' values checked before any data is written
    prepare_data(typed["data"])
    current = OmegaConf.to_container(cfg, resolve=True)
    lock = rundir.claim(run_dir)  # one run at a time in run_dir (rank 0 holds it), else one line
    try:
        return _run(cfg, typed, mm, run_dir, current, device.type)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig, typed: Mapping[str, Any], mm: Any, run_dir: Path, current: dict[str, Any],
         device: str) -> dict[str, Any]:
    from mmengine.runner import Runner

    from lbc.detection.plugin import find_sparsity, mmengine_safe_globals

    resume_from = _check_resume(run_dir, current)
    stop = signals.GracefulStop()
    control = _control_hook(stop)
    with _cleanup_failed_start(run_dir, lambda: control.started):
        if distributed.is_main():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(current))
            where = f", resuming from {resume_from}" if resume_from else ""
            log.info("lbc: %s on %s, sparsity %s, %s, %d process(es), %d epochs%s; run dir %s", cfg.model.name,
                     cfg.data.name, cfg.sparsity.method, device, distributed.world_size(), cfg.schedule.epochs,
                     where, run_dir)
        with mmengine_safe_globals(), _console(typed["trainer"].progress):
            try:
                runner = Runner.from_cfg(mm)
            except (TypeError, KeyError) as e:  # mmengine's registry: a bad type or keyword in the built config
                raise ConfigError(f"building the detector from model.mmdet_config={cfg.model.mmdet_config} failed: "
                                  f"{' '.join(str(e).split())} (check model.cfg_options)") from None
            runner.register_hook(control, priority="LOWEST")
            try:
                with stop:
                    runner.train()
            except _Stop as e:
                raise _stopped(stop, e, run_dir) from None
            except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
                if resume_from is None or control.looping:
                    raise
                reason = next((ln.strip() for ln in str(e).splitlines() if "error:" in ln.lower()),
                              str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                raise ConfigError(f"run_dir={run_dir}: cannot resume from {resume_from}: {reason}; start a new "
                                  f"run_dir, or remove {run_dir / 'last_checkpoint'} to start this one over") from None

    metrics = control.metrics if control.metrics is not None else _last_metrics(run_dir)
    result = _result(metrics, find_sparsity(runner.model).report().get("scalars", {}), run_dir)
    if distributed.is_main():
        log.info("%s", _done_line(result))
    distributed.barrier()
    return result

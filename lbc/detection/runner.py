"""``task=detection``: one MMDetection training run driven by the Hydra config (``lbc-train task=detection``).

The run's life (its directory claimed and locked, ``config.yaml``, the start and done lines, a graceful
stop, cleaning up a failed start) is :class:`lbc.run.lifecycle.Run`'s, as for every task. What this
module adds: it checks the config and the data (one-line errors, nothing built), turns the config into
mmengine's (:func:`lbc.detection.config.to_mmengine`) and lets mmengine's ``Runner`` train: its logs
and config dump go to ``<run_dir>/<timestamp>/`` (TensorBoard events under ``vis_data/``), its
checkpoints to ``<run_dir>/epoch_<n>.pth`` (named by ``<run_dir>/last_checkpoint``), and lbc's
``SparsityHook`` appends one record per evaluation to ``<run_dir>/metrics.jsonl`` (:mod:`lbc.run.records`).
It ends with one line ``done: bbox mAP ... | sparsity: ... | run dir: ...``.

Running the same command (the same run_dir) again resumes from the last checkpoint, after checking
that the config changed only in ways a resume can honour. Inside an epoch, ``trainer.checkpoint_every`` (N
iterations or minutes) writes ``iter_<n>.pth`` (the newest only, named by ``last_checkpoint``; an epoch's
checkpoint replaces it), and a resume from it continues with the next batch (:mod:`lbc.detection.loop`).
SIGTERM, SIGUSR1 or a first Ctrl-C stop the run at the next iteration: inside an epoch ``iter_<n>.pth`` is
written there; at or after an epoch's last iteration its checkpoint is written and its validation (if due)
finishes first, so its metrics.jsonl record is written once and the resume continues with the next epoch;
during the last epoch the run finishes. One line says what a resume continues from, and the exit status
is 143/138/130.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lbc import config as lbc_config
from lbc.detection.config import checkpoint_in, class_names, data_root, resolve_mmdet_config, to_mmengine
from lbc.detection.data import check_coco_data
from lbc.detection.shapes import make_shapes_coco
from lbc.errors import ConfigError
from lbc.io import atomic_write
from lbc.run import distributed
from lbc.run.cadence import StepCheckpoints
from lbc.run.lifecycle import CONFIG_FILE, Run
from lbc.run.records import last_metrics, sparsity_scalars
from lbc.run.resume import check_resume
from lbc.run.signals import AGREE_EVERY, Stopped

__all__ = ["prepare_data", "run"]

METRICS = ("bbox_mAP", "segm_mAP")


# --- before anything is built -------------------------------------------------------------------


def prepare_data(data: Any, masks: bool = False) -> Path:
    """The data root, checked: its layout (a missing root / annotation file / image folder: ConfigError)
    and its content (:func:`lbc.detection.data.check_coco_data`: DataError naming the file, image or
    annotation id), one line each; ``masks``: the model predicts masks. The shapes set is generated
    there first when it is not (idempotent, locked: every rank may call it)."""
    root = data_root(data)
    if hasattr(data, "train_images"):  # the generated shapes set
        try:
            make_shapes_coco(root, train_images=data.train_images, val_images=data.val_images,
                             image_size=data.image_size, max_objects=data.max_objects, seed=data.seed)
        except OSError as e:
            raise ConfigError(f"data.root={root}: cannot write the shapes data set there: {e.strerror or e}") from None
    check_coco_data(root, class_names(data), masks=masks)
    return root


def _predicts_masks(mm: Any) -> bool:
    """The built config evaluates masks (``segm`` among CocoMetric's metrics: Mask R-CNN)."""
    evaluators = mm.get("val_evaluator") or []
    for evaluator in [evaluators] if isinstance(evaluators, Mapping) else evaluators:
        metric = evaluator.get("metric", ())
        if "segm" in ([metric] if isinstance(metric, str) else list(metric)):
            return True
    return False


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


def _check_resume(run_dir: Path, cfg: DictConfig) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), after refusing in one line a config
    change a resume cannot honour (the run dir's config.yaml against this run's; each key's rule is
    declared beside its field in lbc/config/detection.py)."""
    saved_file = run_dir / CONFIG_FILE
    saved = OmegaConf.load(saved_file) if saved_file.is_file() else None
    task = OmegaConf.select(saved, "task.name", default="classification") if saved is not None else None
    if task is not None and task != "detection":  # its checkpoint (last.pt) is not mmengine's; its records would go
        raise ConfigError(f"run_dir={run_dir} holds a task={task} run ({saved_file}); a detection run cannot "
                          "resume it or share its folder: use another run_dir")
    ckpt = checkpoint_in(run_dir)
    if ckpt is not None and _epoch_of(ckpt) is None and not re.fullmatch(r"iter_\d+\.pth", ckpt.name):
        raise ConfigError(f"run_dir={run_dir}: last_checkpoint names {ckpt}, which is not a checkpoint mmengine "
                          "wrote (epoch_<n>.pth); a detection run resumes only its own: use another run_dir")
    if ckpt is None or saved is None:
        return ckpt
    check_resume(OmegaConf.to_container(saved, resolve=False), cfg, key="run_dir", path=ckpt)
    return ckpt


# --- while mmengine runs -------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside mmengine's loop to stop on a signal (caught by :func:`run`)."""

    def __init__(self, epoch: int, step: int, written: bool) -> None:
        super().__init__(f"stop at epoch {epoch} step {step}")
        self.epoch, self.step, self.written = epoch, step, written


def _control_hook(run: Run, checkpoint_every: Any) -> Any:
    """A hook (lowest priority: after the checkpoint hook and SparsityHook) that writes checkpoints inside an
    epoch, stops on a signal between iterations, marks the run started after its first iteration, and keeps the
    last validation's metrics.

    Inside an epoch, every ``checkpoint_every`` (:class:`~lbc.run.cadence.StepCheckpoints`: N iterations, N
    minutes, null) and at a stop, it writes ``iter_<n>.pth`` (every hook's state: SparsityHook's schedule, RNG
    states and record clock), then points ``last_checkpoint`` at it and removes the previous one; an epoch's
    checkpoint (mmengine's CheckpointHook) makes them obsolete. A stop at or after an epoch's last iteration
    (its checkpoint is then written) waits for that epoch's validation, if one is due, so its record reaches
    ``metrics.jsonl`` before the run stops: the resume starts at the next epoch and neither repeats nor loses
    that record. A stop during the last epoch's validation lets the run finish, as classification's does.
    """
    from mmengine.dist import is_main_process
    from mmengine.hooks import Hook

    stop = run.stop
    cadence = StepCheckpoints(checkpoint_every, stop)

    class _Control(Hook):
        priority = "LOWEST"

        def __init__(self) -> None:
            self.looping = False  # the train loop began (a resume, if any, has loaded)
            self.metrics: dict[str, Any] | None = None
            self._pending = False  # a whole epoch is done (and saved) and a stop was asked: stop after its validation

        def _asked(self, runner: Any, last: bool) -> bool:
            every = (runner.iter + 1) % AGREE_EVERY == 0  # under torchrun: ask the other ranks now and then
            return stop.agreed(communicate=every or last)

        def _stop_between_epochs(self, runner: Any) -> None:
            """After epoch ``runner.epoch`` (completed, saved, validated if due): stop unless it was the last."""
            if runner.epoch < runner.max_epochs:
                raise _Stop(runner.epoch, len(runner.train_dataloader), written=True)

        def before_train(self, runner: Any) -> None:
            self.looping = True
            cadence.written()  # the clock of checkpoint_every=<N>min starts with the training

        def before_train_epoch(self, runner: Any) -> None:
            if self._pending:  # no validation was due after the epoch the stop came in
                self._stop_between_epochs(runner)

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
            run.started = True
            last = batch_idx + 1 == len(runner.train_dataloader)
            if self._asked(runner, last):
                if not last:
                    _save_inside_epoch(runner, batch_idx + 1)
                    raise _Stop(runner.epoch + 1, batch_idx + 1, written=True)
                self._pending = True  # the epoch is whole: let the checkpoint hook save it, then validate
            elif not last and cadence.due(runner.iter + 1):  # every rank asks: minutes are agreed under torchrun
                _save_inside_epoch(runner, batch_idx + 1)
                cadence.written()

        def after_train_epoch(self, runner: Any) -> None:
            self._pending = self._pending or stop.agreed()
            ckpt = checkpoint_in(runner.work_dir)
            if is_main_process() and ckpt is not None and not ckpt.name.startswith("iter_"):
                _remove_iteration_checkpoints(Path(runner.work_dir))  # the epoch's checkpoint holds more
            if ckpt is not None and ckpt.name.startswith("epoch_"):
                cadence.written()

        def after_val_epoch(self, runner: Any, metrics: dict[str, Any] | None = None) -> None:
            self.metrics = dict(metrics or {})

        def after_val(self, runner: Any) -> None:
            """After SparsityHook wrote the epoch's record (and restored the RNG states): stop if asked."""
            if self._pending or stop.agreed():
                self._stop_between_epochs(runner)
            self._pending = False

    return _Control()


def _save_inside_epoch(runner: Any, epoch_step: int) -> None:
    """Write ``iter_<n>.pth`` (n: iterations completed; meta ``epoch``: epochs completed, ``epoch_step``: the
    iterations of the current one) under a temporary name, rename it, point ``last_checkpoint`` at it and remove
    the older ``iter_*.pth``: a kill at any moment leaves ``last_checkpoint`` naming a whole checkpoint."""
    from mmengine.dist import is_main_process

    from lbc.detection.hook import SparsityHook

    for hook in runner.hooks:  # every rank's RNG states: the save below runs on rank 0 only
        if isinstance(hook, SparsityHook):
            hook.gather_rng_states(runner)
    work_dir = Path(runner.work_dir)
    name = f"iter_{runner.iter + 1}.pth"
    temporary = f".{name}.tmp"
    runner.save_checkpoint(str(work_dir), temporary, by_epoch=False, meta=dict(epoch_step=epoch_step))  # rank 0 writes
    if is_main_process():
        os.replace(work_dir / temporary, work_dir / name)
        atomic_write(work_dir / "last_checkpoint", lambda tmp: tmp.write_text(str(work_dir / name)))
        _remove_iteration_checkpoints(work_dir, keep=name)


def _remove_iteration_checkpoints(work_dir: Path, keep: str | None = None) -> None:
    for old in work_dir.glob("iter_*.pth"):
        if old.name != keep:
            old.unlink(missing_ok=True)


def _position_of(checkpoint: Path | None) -> tuple[int, int] | None:
    """(epochs completed, iterations of the next epoch) a checkpoint holds: ``epoch_<n>.pth`` is (n, 0); an
    ``iter_<n>.pth`` says it in its meta. None for another name, or a file whose meta cannot be read."""
    epochs = _epoch_of(checkpoint)
    if epochs is not None or checkpoint is None or not re.fullmatch(r"iter_\d+\.pth", checkpoint.name):
        return None if epochs is None else (epochs, 0)
    import torch

    from lbc.detection.checkpoint import mmengine_safe_globals

    try:
        with mmengine_safe_globals():
            meta = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
        return int(meta["epoch"]), int(meta["epoch_step"])
    except Exception:  # unreadable: the resume itself says why, in one line
        return None


def _epoch_of(checkpoint: Path | None) -> int | None:
    """The epochs a checkpoint ``epoch_<n>.pth`` holds (None for any other name)."""
    match = re.fullmatch(r"epoch_(\d+)\.pth", checkpoint.name) if checkpoint else None
    return int(match.group(1)) if match else None


def _stopped(run: Run, err: _Stop) -> Stopped:
    ckpt = checkpoint_in(run.run_dir)
    at = _position_of(ckpt) or (0, 0)
    written = err.written and at == ((err.epoch, 0) if err.step == 0 or at[1] == 0 else (err.epoch - 1, err.step))
    return run.stopped(epoch=err.epoch, step=err.step, written=written, checkpoint=ckpt, checkpoint_epoch=at[0])


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


def _maps(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The final ``coco/bbox_mAP`` (and ``coco/segm_mAP`` for Mask R-CNN) as floats."""
    return {f"coco/{name}": float(metrics[f"coco/{name}"]) for name in METRICS if metrics.get(f"coco/{name}") is not None}


def _headline(maps: Mapping[str, float]) -> str:
    """``bbox mAP 0.028  segm mAP 0.038`` (the done line's metrics)."""
    return "  ".join(f"{key.removeprefix('coco/').split('_')[0]} mAP {v:.3f}" for key, v in maps.items()) or "mAP n/a"


# --- the run -------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the detector ``cfg`` describes with mmengine's Runner; returns the final metrics
    (``coco/bbox_mAP``, ``coco/segm_mAP`` for Mask R-CNN, ``sparsity/<scalar>``, ``run_dir``)."""
    typed = lbc_config.validate(cfg)
    device = _select_device(typed["trainer"])
    distributed.init(device)  # under torchrun: the process group (mmengine then uses it), before the run dir is shared
    with Run.claim(cfg) as run:  # one run at a time in run_dir (rank 0 holds it), else one line
        return _train(run, typed, device.type)


def _train(run: Run, typed: Mapping[str, Any], device: str) -> dict[str, Any]:
    from mmengine.runner import Runner

    from lbc.detection.plugin import find_sparsity, mmengine_safe_globals

    cfg, run_dir = run.cfg, run.run_dir
    _check_inputs(typed)
    mm = to_mmengine(cfg, typed)  # model.cfg_options and the groups' values checked before any data is written
    prepare_data(typed["data"], masks=_predicts_masks(mm))
    resume_from = _check_resume(run_dir, cfg)
    position = _position_of(resume_from) if resume_from else (0, 0)
    run.begin(device, f"{cfg.schedule.epochs} epochs", resumed_from=resume_from,
              resumed_epoch=position[0] if position else None, resumed_epoch_step=position[1] if position else 0)
    control = _control_hook(run, typed["trainer"].checkpoint_every)
    with mmengine_safe_globals(), _console(typed["trainer"].progress):
        try:
            runner = Runner.from_cfg(mm)
        except (TypeError, KeyError) as e:  # mmengine's registry: a bad type or keyword in the built config
            raise ConfigError(f"building the detector from model.mmdet_config={cfg.model.mmdet_config} failed: "
                              f"{' '.join(str(e).split())} (check model.cfg_options)") from None
        runner.register_hook(control, priority="LOWEST")
        try:
            with run.stop:
                runner.train()
        except _Stop as e:
            raise _stopped(run, e) from None
        except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
            if resume_from is None or control.looping:
                raise
            reason = next((ln.strip() for ln in str(e).splitlines() if "error:" in ln.lower()),
                          str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ConfigError(f"run_dir={run_dir}: cannot resume from {resume_from}: {reason}; start a new "
                              f"run_dir, or remove {run_dir / 'last_checkpoint'} to start this one over") from None

    maps = _maps(control.metrics if control.metrics is not None else last_metrics(run_dir))
    return run.done(_headline(maps), {**maps, **sparsity_scalars(find_sparsity(runner.model))})

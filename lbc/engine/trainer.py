"""The classification run, top to bottom: :func:`build` (data, model, sparsity, optimizer, resume), then
:func:`fit` (the loop, checkpoints, summary); :func:`run` is both.

As in torchvision's ``references/classification/train.py``: no hidden control flow. What every task's
run does (the run directory, config.yaml, the metrics record, the start and done lines, a graceful
stop, cleaning up a failed start) is :class:`lbc.run.lifecycle.Run`'s; this module supplies the
rest. The sparsity method is reached only through its interface (``lbc.sparsify`` returns it); the
trainer never asks which method it is running. Messages go through ``logging`` (the ``lbc``
logger): Hydra's ``train.log`` in the run directory keeps them, the console shows them plain.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

import lbc
from lbc import config as lbc_config
from lbc.data import build_datasets, build_loader, build_mixup
from lbc.engine import checkpoint
from lbc.engine.loop import EpochProgress, evaluate, train_one_epoch
from lbc.engine.optim import build_optimizer, build_phased_scheduler, param_groups
from lbc.errors import ConfigError, DataError
from lbc.io import load_model_weights
from lbc.models import build_model
from lbc.run import distributed
from lbc.run.cadence import StepCheckpoints
from lbc.run.lifecycle import Run
from lbc.run.records import sparsity_scalars
from lbc.run.resume import check_resume
from lbc.run.signals import GracefulStop, Stopped

log = logging.getLogger("lbc")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def as_kwargs(group: Any) -> dict[str, Any]:
    """A validated config group as builder keywords (a schema's dataclass, or a plain node)."""
    if dataclasses.is_dataclass(group):
        return dataclasses.asdict(group)
    return OmegaConf.to_container(group, resolve=True)


@dataclass
class Training:
    """Everything :func:`fit` needs, as :func:`build` made it (and resumed it)."""

    cfg: DictConfig
    run: Run  # the claimed run directory (rank 0 holds its lock from build() to the end of fit())
    device: torch.device
    model: nn.Module
    sparsity: Any  # the method object lbc.sparsify returned
    ema: ModelEmaV3 | None
    train_loader: Any
    val_loader: Any
    criterion: nn.Module
    mixup: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    epochs: int
    steps: int
    start_epoch: int = 0
    start: EpochProgress | None = None  # this rank's place inside epoch start_epoch, from a checkpoint written there
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    resumed_from: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    def release(self) -> None:
        """Give the run directory back (fit() does it at its end, however it ends)."""
        self.run.close()

    def state(self, epoch: int, progress: EpochProgress | None = None) -> dict[str, Any]:
        """The checkpoint after ``epoch`` epochs and, inside the next one, ``progress.step`` steps (every rank
        gathers its RNG state and its epoch totals; rank 0 writes). Resuming it continues with the next batch."""
        inside = progress is not None and progress.step > 0
        return {
            "model": self.model.state_dict(),
            "sparsity": self.sparsity.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "epoch_step": progress.step if inside else 0,  # steps done in epoch `epoch` + 1
            "epoch_progress": distributed.all_gather_object(progress.state_dict()) if inside else None,
            "rng": checkpoint.gather_rng_states(),
            "metrics": self.last,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load(self, path: str, key: str = "trainer.resume") -> None:
        """Continue from the checkpoint at ``path``: weights, optimizer, schedule, RNG, epoch.

        Everything is checked before anything is loaded (ours? the same method, pattern, model and
        optimizer? a config whose changes a resume can honour?): a mismatch is one ConfigError line.
        """
        ckpt = checkpoint.load(path, key)
        checkpoint.check_compatible(ckpt, self.sparsity.state_dict(), key, path, model_state=self.model.state_dict(),
                                    optimizer_state=self.optimizer.state_dict())
        changed = check_resume(ckpt.get("config") or {}, self.cfg, epoch=int(ckpt["epoch"]), key=key, path=path)
        if changed:
            log.info("resuming with changed %s (a resume honours these)", ", ".join(changed))
        self.model.load_state_dict(ckpt["model"])
        self.sparsity.load_state_dict(ckpt["sparsity"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # {} from a disabled GradScaler (no fp16 before): keep this run's fresh one
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:  # EMA switched on at resume: start it from the resumed weights, not the initial ones
                self.ema.set(self.model)
        self.start_epoch, self.last, self.resumed_from = int(ckpt["epoch"]), ckpt.get("metrics", {}), path
        same_world = checkpoint.restore_rng_states(ckpt["rng"])
        progress = ckpt.get("epoch_progress")
        if int(ckpt.get("epoch_step") or 0) > 0 and progress:
            if not same_world:  # each rank's share of the epoch differs with the processes: redo the epoch
                log.info("%s: written inside epoch %d by %d process(es), resumed with %d: epoch %d starts over",
                         path, self.start_epoch + 1, len(ckpt["rng"]), distributed.world_size(), self.start_epoch + 1)
            elif int(ckpt["epoch_step"]) > self.steps:
                raise ConfigError(f"{key}={path!r} is at step {ckpt['epoch_step']} of epoch {self.start_epoch + 1}, "
                                  f"past the {self.steps} steps an epoch has now; put trainer.max_steps_per_epoch back")
            else:
                self.start = EpochProgress.from_state(progress[distributed.rank()])


def build(cfg: DictConfig) -> Training:
    """Check ``cfg`` and build the run: data, model with its sparsity method, optimizer, schedule.

    Takes the run directory (one run at a time: :meth:`Run.claim`; rank 0 holds the lock until
    :func:`fit` ends, and gives it back if building fails). Resumes from ``trainer.resume``, else
    from ``<run_dir>/last.pt`` when it exists.
    """
    typed = lbc_config.validate(cfg)
    device = distributed.pick_device(typed["trainer"].device)
    distributed.init(device)
    run = Run.claim(cfg)  # a usable run_dir no other live run holds, else one ConfigError line (every rank)
    try:
        return _build(cfg, typed, device, run)
    except BaseException as err:
        run.close(err)
        raise


def _build(cfg: DictConfig, typed: dict[str, Any], device: torch.device, run: Run) -> Training:
    tcfg, run_dir = typed["trainer"], run.run_dir
    amp_dtype = AMP_DTYPES[tcfg.amp] if tcfg.amp in AMP_DTYPES and device.type == "cuda" else None
    memory_format = torch.channels_last if tcfg.channels_last else torch.preserve_format

    # --- data ------------------------------------------------------------------------------
    data_cfg = as_kwargs(typed["data"])
    loader_cfg, mixup_cfg = data_cfg.pop("loader", {}), data_cfg.pop("augment", {})
    datasets = build_datasets(**data_cfg)
    seed_everything(cfg.seed)
    dist_on = distributed.is_distributed()
    train_loader = build_loader(datasets.train, train=True, seed=cfg.seed, distributed=dist_on, **loader_cfg)
    if len(train_loader) == 0:  # drop_last with fewer images than one batch: no step at all
        given = loader_cfg.get("global_batch_size")
        batch = (f"data.loader.batch_size={train_loader.batch_size}" if given is None else
                 f"data.loader.global_batch_size={given} ({train_loader.batch_size} per process)")
        raise DataError(f"{batch} is larger than the training split ({len(train_loader.sampler)} images per process) "
                        "and the last partial batch is dropped: no training step; lower the batch size")
    val_cfg = {k: v for k, v in loader_cfg.items() if k not in ("repeated_aug", "drop_last")}
    val_loader = build_loader(datasets.val, train=False, seed=cfg.seed, distributed=dist_on, **val_cfg)
    mixup = build_mixup(num_classes=datasets.num_classes, **mixup_cfg)
    smoothing = float(mixup_cfg.get("label_smoothing", 0.0) or 0.0)
    criterion = SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=smoothing)

    # --- model and sparsity method (attached before the optimizer and DDP) --------------------
    model = build_model(num_classes=datasets.num_classes, **as_kwargs(typed["model"]))
    model = model.to(device, memory_format=memory_format)
    if tcfg.init_from:
        load_model_weights(model, tcfg.init_from, "trainer.init_from")
    sp = lbc.sparsify(model, **as_kwargs(typed["sparsity"]), input_size=datasets.input_size)
    ema = ModelEmaV3(model, decay=tcfg.ema_decay) if tcfg.ema else None

    # --- optimizer (lr for the global batch: trainer.auto_scale_lr), schedule (one cosine per phase) ----
    ocfg, scfg = typed["optim"], typed["schedule"]
    world, per_process = distributed.world_size(), train_loader.batch_size
    lr = lbc_config.scaled_lr(ocfg.lr, per_process * world, tcfg.auto_scale_lr)
    if tcfg.auto_scale_lr is not None and scfg.min_lr > lr:
        raise ConfigError(f"schedule.min_lr={scfg.min_lr} is above the scaled lr {lr:g} (optim.lr={ocfg.lr} x "
                          f"{per_process * world}/{tcfg.auto_scale_lr}, trainer.auto_scale_lr); lower schedule.min_lr")
    if distributed.is_main():
        how = (f" = optim.lr {ocfg.lr:g} x {per_process * world}/{tcfg.auto_scale_lr} (trainer.auto_scale_lr)"
               if tcfg.auto_scale_lr is not None else " (optim.lr)")
        log.info("batch %d = %d process(es) x %d; lr %g%s", per_process * world, world, per_process, lr, how)
    groups = param_groups(model, sp, ocfg.weight_decay)
    extra = {k: v for k, v in as_kwargs(ocfg).items() if k in ("momentum", "nesterov", "betas", "eps")}
    optimizer = build_optimizer(ocfg.name, groups, lr=lr, weight_decay=ocfg.weight_decay, **extra)
    steps = len(train_loader) if tcfg.max_steps_per_epoch is None else min(len(train_loader), tcfg.max_steps_per_epoch)
    scheduler = build_phased_scheduler(optimizer, sp.phases(), scfg.epochs, steps, warmup_epochs=scfg.warmup_epochs,
                                       warmup_lr=scfg.warmup_lr, min_lr=scfg.min_lr)
    training = Training(
        cfg=cfg, run=run, device=device, model=model, sparsity=sp, ema=ema, train_loader=train_loader,
        val_loader=val_loader, criterion=criterion, mixup=mixup, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        epochs=scfg.epochs, steps=steps,
    )  # fmt: skip

    # --- resume: an explicit trainer.resume, else <run_dir>/last.pt if present -------------
    if distributed.is_main() and run_dir.is_dir():
        for stale in checkpoint.clean_stale_temp(run_dir):  # left by a save that a kill interrupted
            log.info("removed %s, left by an interrupted save", stale)
    resume = tcfg.resume or (str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None)
    if resume:
        training.load(resume, "trainer.resume" if tcfg.resume else "run_dir")
    else:
        seed_everything(cfg.seed + distributed.rank())  # per-rank randomness (dropout, mixup) from here on
    return training


def fit(t: Training) -> dict[str, Any]:
    """Train from where ``t`` stands to the end; returns the final metrics (top1, top5, sparsity scalars, run_dir).

    ``last.pt`` is written at epoch ends (``trainer.ckpt_interval``) and inside epochs
    (``trainer.checkpoint_every``: steps or minutes); a resume from one written inside an epoch
    continues with the next batch, bit-exact. On SIGTERM, SIGUSR1 (SLURM's warning before a
    preemption) or a first Ctrl-C (``t.run.stop``) it stops after the current optimizer step, writes
    ``last.pt`` at that step, logs one line and raises :class:`~lbc.run.signals.Stopped`. The run
    directory is given back however fit ends.
    """
    with t.run, t.run.stop as stop:
        return _fit(t, stop)


def _fit(t: Training, stop: GracefulStop) -> dict[str, Any]:
    tcfg, sp, run, main = t.cfg.trainer, t.sparsity, t.run, distributed.is_main()
    sp.exclude_from_ddp(t.model)  # scores, masks: the method's own, never in the DDP wrapper
    replica = distributed.Replica(t.model, t.device, compile=tcfg.compile, find_unused_parameters=tcfg.find_unused_parameters)
    resumed_step = t.start_epoch * t.steps + (t.start.step if t.start else 0)
    run.begin(t.device, f"{t.epochs} epochs x {t.steps} steps", resumed_from=t.resumed_from,
              resumed_epoch=t.start_epoch, resumed_step=resumed_step if t.start else None,
              resumed_epoch_step=t.start.step if t.start else 0, tensorboard=True)

    milestones = sp.milestones()
    batches = stop.batches(t.train_loader)  # ends the epoch's iteration early once a stop is requested
    saved = (t.start_epoch, t.resumed_from) if t.resumed_from else None  # (epochs, path) a resume continues from
    last_pt = t.run_dir / "last.pt"
    cadence = StepCheckpoints(tcfg.checkpoint_every, stop)

    def write(epochs_done: int, progress: EpochProgress | None = None) -> None:
        nonlocal saved
        ckpt = t.state(epochs_done, progress)  # collective: every rank
        if main:
            checkpoint.save(ckpt, last_pt)
        saved = (epochs_done, str(last_pt))
        cadence.written()

    def stopped(epoch: int, step: int, written: bool) -> Stopped:
        return run.stopped(epoch=epoch, step=step, written=written, checkpoint=saved[1] if saved else None,
                           checkpoint_epoch=saved[0] if saved else 0, explicit_resume=tcfg.resume)

    eval_args = dict(device=t.device, amp_dtype=t.amp_dtype, channels_last=tcfg.channels_last,
                     max_steps=tcfg.max_eval_steps)
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        for epoch in range(t.start_epoch, t.epochs):
            progress, t.start = t.start or EpochProgress(), None
            t0 = time.perf_counter() - progress.seconds
            t.train_loader.set_epoch(epoch, start=progress.step)

            def after_step(state: EpochProgress, epoch: int = epoch, t0: float = t0) -> None:
                run.started = True  # a step has finished: what the run wrote is kept, whatever happens next
                if state.step < t.steps and cadence.due(epoch * t.steps + state.step):
                    state.seconds = time.perf_counter() - t0
                    write(epoch, state)

            stats = train_one_epoch(
                replica, batches, t.criterion, t.optimizer, t.scheduler, sp,
                epoch=epoch, epochs=t.epochs, steps=t.steps, device=t.device, scaler=t.scaler,
                amp_dtype=t.amp_dtype, mixup=t.mixup, ema=t.ema, clip_grad=tcfg.clip_grad,
                channels_last=tcfg.channels_last, log_interval=tcfg.log_interval,
                log_step=lambda v, s: run.record.scalars(v, s, prefix="train/"), progress=main and tcfg.progress,
                state=progress, after_step=after_step,
            )  # fmt: skip
            if stop.agreed() and progress.step < t.steps:  # stopped inside the epoch: save at this step
                if progress.step > 0:
                    progress.seconds = time.perf_counter() - t0
                    write(epoch, progress)
                elif epoch > 0 and not (saved and saved[0] == epoch):  # before the epoch's first step: its start
                    write(epoch)
                raise stopped(epoch + 1, progress.step, written=saved is not None)
            if stats["train_images"] == 0:  # every image unreadable: nothing was trained
                raise DataError(f"epoch {epoch + 1} had no readable training image ({stats['train_skipped']} "
                                f"unreadable): check data.root")
            run.started = True
            distributed.broadcast_buffers(t.model)  # the sharded evaluation and the checkpoint see rank 0's BN stats
            stats |= evaluate(t.model, t.val_loader, **eval_args)
            if stats["val_images"] == 0:
                raise DataError(f"epoch {epoch + 1}: no readable validation image ({stats['val_skipped']} "
                                "unreadable): the accuracy would mean nothing; check data.root")
            if t.ema is not None:
                stats["ema_top1"] = evaluate(t.ema.module, t.val_loader, **eval_args)["top1"]
            stats["seconds"] = time.perf_counter() - t0
            done = epoch + 1
            t.last = {"epoch": done, "step": done * t.steps, **stats,
                      "skipped": stats["train_skipped"] + stats["val_skipped"], **sparsity_scalars(sp)}
            run.evaluated(t.last, t.epochs)  # metrics.jsonl, and the epoch line from what it wrote

            keep = [name for name, at in milestones.items() if at == done]
            stopping = stop.agreed()  # a stop after the epoch's last step: save this whole epoch, then stop
            if done % tcfg.ckpt_interval == 0 or done == t.epochs or keep or stopping:
                write(done)
                if main:
                    for name in keep:
                        checkpoint.copy(last_pt, t.run_dir / f"{name}.pt")
            if stopping and done < t.epochs:
                raise stopped(done, t.steps, written=True)

    sp.finalize()  # raises if the method's promise (e.g. exact N:M) is broken
    ckpt = t.state(t.epochs)
    if main:
        checkpoint.save(ckpt, t.run_dir / "last.pt")
    top1 = t.last.get("top1")
    return run.done(f"top-1 {top1:.2f}%" if top1 is not None else "top-1 n/a",
                    {"top1": top1, "top5": t.last.get("top5"), **sparsity_scalars(sp)})


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says (``build`` then ``fit``); returns the final metrics."""
    return fit(build(cfg))

"""The training run, top to bottom: data, model, sparsity, optimizer, resume, loop, checkpoints, summary.

As in torchvision's ``references/classification/train.py``: no hidden control flow. The sparsity
method is reached only through its interface (``lbc.sparsify`` returns it); the trainer never
asks which method it is running.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

import lbc
from lbc import config as lbc_config
from lbc.data import build_datasets, build_loader, build_mixup
from lbc.engine import checkpoint, distributed
from lbc.engine.logging import RunLogger
from lbc.engine.loop import evaluate, train_one_epoch
from lbc.engine.optim import PhasedScheduler, build_optimizer, weight_decay_groups
from lbc.errors import ConfigError
from lbc.models import build_model

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def share_run_dir(run_dir: str) -> str:
    """Rank 0's run dir on every rank (``${now:...}`` may differ by a second between ranks).

    A rank whose Hydra made a different, fresh directory removes it.
    """
    chosen = distributed.broadcast_object(run_dir)
    own = Path(run_dir)
    if chosen != run_dir and own.is_dir() and {p.name for p in own.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(own, ignore_errors=True)
    return chosen


def sparsity_scalars(sp: Any) -> dict[str, float]:
    """The method's report scalars as ``sparsity/<name>`` (the TensorBoard and metrics.jsonl key)."""
    return {f"sparsity/{k}": float(v) for k, v in sp.report().get("scalars", {}).items()}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final metrics (top1, top5, sparsity scalars, run_dir)."""
    lbc_config.validate(cfg)
    device = distributed.pick_device(cfg.trainer.device)
    distributed.init(device)
    main = distributed.is_main()
    run_dir = Path(share_run_dir(str(cfg.run_dir)))
    tcfg = cfg.trainer
    amp_dtype = AMP_DTYPES[tcfg.amp] if tcfg.amp in AMP_DTYPES and device.type == "cuda" else None
    memory_format = torch.channels_last if tcfg.channels_last else torch.preserve_format

    # --- data ------------------------------------------------------------------------------
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    loader_cfg, mixup_cfg = data_cfg.pop("loader", {}), data_cfg.pop("augment", {})
    datasets = build_datasets(**data_cfg)
    seed_everything(cfg.seed)
    dist_on = distributed.is_distributed()
    train_loader = build_loader(datasets.train, train=True, seed=cfg.seed, distributed=dist_on, **loader_cfg)
    val_cfg = {k: v for k, v in loader_cfg.items() if k not in ("repeated_aug", "drop_last")}
    val_loader = build_loader(datasets.val, train=False, seed=cfg.seed, distributed=dist_on, **val_cfg)
    mixup = build_mixup(num_classes=datasets.num_classes, **mixup_cfg)
    smoothing = float(mixup_cfg.get("label_smoothing", 0.0) or 0.0)
    criterion = SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=smoothing)

    # --- model and sparsity method (attached before the optimizer and DDP) --------------------
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(num_classes=datasets.num_classes, **model_cfg).to(device, memory_format=memory_format)
    sp = lbc.sparsify(model, **OmegaConf.to_container(cfg.sparsity, resolve=True), input_size=datasets.input_size)
    ema = ModelEmaV3(model, decay=tcfg.ema_decay) if tcfg.ema else None

    # --- optimizer, schedule --------------------------------------------------------------
    ocfg, scfg = cfg.optim, cfg.schedule
    groups = weight_decay_groups(model, ocfg.weight_decay, exclude=sp.score_parameters())
    groups += sp.param_groups(ocfg.weight_decay)
    extra = {k: ocfg[k] for k in ("momentum", "nesterov", "betas", "eps") if k in ocfg}
    optimizer = build_optimizer(ocfg.name, groups, lr=ocfg.lr, weight_decay=ocfg.weight_decay, **extra)
    steps = len(train_loader) if tcfg.max_steps_per_epoch is None else min(len(train_loader), tcfg.max_steps_per_epoch)
    epochs = int(scfg.epochs)
    phases = [epochs_ for _, epochs_ in sp.phases()] or [epochs]
    if abs(sum(phases) - epochs) > 1e-6:
        named = " + ".join(f"{name} {e:g}" for name, e in sp.phases())
        raise ConfigError(f"the sparsity method's phases ({named}) must add up to schedule.epochs={epochs}")
    scheduler = PhasedScheduler(
        optimizer, phases, steps, warmup_epochs=scfg.warmup_epochs, warmup_lr=scfg.warmup_lr, min_lr=scfg.min_lr
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # --- resume: an explicit trainer.resume, else <run_dir>/last.pt if present -------------
    start_epoch, last = 0, {}
    resume = tcfg.resume or (str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else None)
    if resume:
        ckpt = checkpoint.load(resume)
        model.load_state_dict(ckpt["model"])
        sp.load_state_dict(ckpt["sparsity"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, last = int(ckpt["epoch"]), ckpt.get("metrics", {})
        rng = ckpt["rng"]
        checkpoint.set_rng_state(rng[distributed.rank()] if len(rng) == distributed.world_size() else rng[0])
    else:
        seed_everything(cfg.seed + distributed.rank())  # per-rank randomness (dropout, mixup) from here on
    replica = distributed.Replica(model, device, compile=tcfg.compile, find_unused_parameters=tcfg.find_unused_parameters)

    logger = RunLogger(run_dir, enabled=main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        logger.truncate_after(start_epoch)
        where = f", resuming from {resume} at epoch {start_epoch}" if resume else ""
        print(f"lbc: {cfg.model.name} on {cfg.data.name}, sparsity {cfg.sparsity.method}, {device}, "
              f"{distributed.world_size()} process(es), {epochs} epochs x {steps} steps{where}; run dir {run_dir}")

    def state(epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "sparsity": sp.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch,
            "rng": distributed.all_gather_object(checkpoint.rng_state()),
            "metrics": metrics,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    # --- the loop ---------------------------------------------------------------------------
    milestones = sp.milestones()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(
            replica, train_loader, criterion, optimizer, scheduler, sp,
            epoch=epoch, epochs=epochs, steps=steps, device=device, scaler=scaler, amp_dtype=amp_dtype,
            mixup=mixup, ema=ema, clip_grad=tcfg.clip_grad, channels_last=tcfg.channels_last,
            log_interval=tcfg.log_interval, log_step=lambda v, s: logger.scalars(v, s, prefix="train/"),
            progress=main and tcfg.progress,
        )  # fmt: skip
        distributed.broadcast_buffers(model)  # the sharded evaluation and the checkpoint see rank 0's BN stats
        eval_args = dict(device=device, amp_dtype=amp_dtype, channels_last=tcfg.channels_last, max_steps=tcfg.max_eval_steps)
        stats |= evaluate(model, val_loader, **eval_args)
        if ema is not None:
            stats["ema_top1"] = evaluate(ema.module, val_loader, **eval_args)["top1"]
        stats["seconds"] = time.perf_counter() - t0
        last = {"epoch": epoch + 1, **stats, "skipped": stats["train_skipped"] + stats["val_skipped"]}
        last |= sparsity_scalars(sp)
        logger.epoch(last)
        logger.scalars({k: v for k, v in last.items() if k != "epoch"}, epoch + 1, prefix="epoch/")
        if main and tcfg.progress:
            density = f"  density {last['sparsity/density']:.3f}" if "sparsity/density" in last else ""
            print(f"epoch {epoch + 1}/{epochs}: loss {stats['train_loss']:.4f}  top-1 {stats['top1']:.2f}  "
                  f"top-5 {stats['top5']:.2f}  lr {stats['lr']:.2e}{density}  {stats['seconds']:.1f}s", flush=True)

        done = epoch + 1
        keep = [name for name, at in milestones.items() if at == done]
        if done % tcfg.ckpt_interval == 0 or done == epochs or keep:
            ckpt = state(done, last)  # every rank gathers RNG states; rank 0 writes
            if main:
                checkpoint.save(ckpt, run_dir / "last.pt")
                for name in keep:
                    checkpoint.copy(run_dir / "last.pt", run_dir / f"{name}.pt")

    sp.finalize()  # raises if the method's promise (e.g. exact N:M) is broken
    ckpt = state(epochs, last)
    if main:
        checkpoint.save(ckpt, run_dir / "last.pt")
    if tcfg.dump_params:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   run_dir / f"rank{distributed.rank()}_params.pt")
    logger.close()

    result = {"top1": last.get("top1"), "top5": last.get("top5"), **sparsity_scalars(sp), "run_dir": str(run_dir)}
    if main:
        scalars = "  ".join(f"{k.removeprefix('sparsity/')} {v:.4f}" for k, v in sparsity_scalars(sp).items())
        top1 = f"{result['top1']:.2f}%" if result["top1"] is not None else "n/a"
        print(f"done: top-1 {top1}  |  sparsity: {scalars or 'n/a'}  |  run dir: {run_dir}", flush=True)
    distributed.barrier()
    return result

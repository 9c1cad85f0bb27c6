"""One training epoch and one evaluation pass (DeiT ``engine.py`` style: short, top to bottom)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lbc.run import distributed


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.amp autocast on CUDA when ``amp_dtype`` is set; a no-op otherwise (CPU runs stay fp32)."""
    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


@dataclasses.dataclass
class EpochProgress:
    """How far this rank is into a training epoch: saved with a checkpoint written inside the epoch, so
    that the resumed epoch ends with the very totals (mean loss, images, unreadable ones) of an
    uninterrupted one. ``step``: optimizer steps done in the epoch; the rest are this rank's sums."""

    step: int = 0
    loss_sum: float = 0.0  # sum of loss x images (float64)
    seen: int = 0
    skipped: int = 0  # unreadable training images in the steps done
    seconds: float = 0.0  # training time spent in the epoch (wall clock, not part of the exact state)

    def state_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loss_sum": float(self.loss_sum)}  # the running sum may be a tensor

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochProgress:
        return cls(**state) if state else cls()


def train_one_epoch(
    replica: distributed.Replica,
    loader: Any,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sparsity: Any,
    *,
    epoch: int,
    epochs: int,
    steps: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None = None,
    mixup: Callable | None = None,
    ema: nn.Module | None = None,
    clip_grad: float | None = None,
    channels_last: bool = False,
    log_interval: int = 10,
    log_step: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
    state: EpochProgress | None = None,
    after_step: Callable[[EpochProgress], None] | None = None,
) -> dict[str, float]:
    """Train epoch ``epoch`` (0-based) up to its step ``steps``; returns mean loss, last lr, skipped images.

    ``state`` (updated in place) is where the epoch stands: a resumed epoch passes the one its
    checkpoint saved and ``loader`` begins at batch ``state.step``. ``after_step(state)`` runs after every
    optimizer step (the step checkpoints of ``trainer.checkpoint_every``)."""
    replica.train()
    state = state if state is not None else EpochProgress()
    start, skipped_before = state.step, state.skipped
    loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=device)
    seen, done = state.seen, start
    bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
               dynamic_ncols=True, leave=False)
    for i, batch in enumerate(itertools.islice(loader, steps - start), start=start):
        step, done = epoch * steps + i, i + 1
        images, targets = batch
        seen += len(targets)
        sparsity.update(epoch + i / steps)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:  # soft targets; an odd batch loses its last sample
            images, targets = mixup(images, targets)

        with autocast(device, amp_dtype):
            loss = criterion(replica(images), targets)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(replica.module.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step_update(step + 1)
        if ema is not None:
            ema.update(replica.module, step=step + 1)

        loss_sum += loss.detach() * len(targets)
        bar.update(1)
        if (i + 1) % log_interval == 0 or i + 1 == steps:
            # Read the loss (a device sync) only here, not every step; a non-finite loss stops the
            # run before this epoch's checkpoint, so the last good one is what resume picks up.
            value, lr = loss.item(), optimizer.param_groups[0]["lr"]
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at epoch {epoch + 1}, step {i + 1}; stopping")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if log_step is not None:
                log_step({"loss": value, "lr": lr}, step + 1)
        if after_step is not None:
            state.step, state.seen, state.skipped = done, seen, skipped_before + loader.skipped
            state.loss_sum = loss_sum  # a tensor until the state is saved (no device sync per step)
            after_step(state)
    bar.close()
    state.step, state.seen, state.skipped = done, seen, skipped_before + loader.skipped
    state.loss_sum = loss_sum.item()
    total_loss, seen, skipped = distributed.all_reduce_sum([state.loss_sum, seen, state.skipped], device)
    return {
        "train_loss": total_loss / max(seen, 1),
        "lr": optimizer.param_groups[0]["lr"],
        "train_images": int(seen),
        "train_skipped": int(skipped),  # unreadable images, counted by the loader
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_steps: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean loss over the (sharded, then summed) validation set."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss = correct1 = correct5 = seen = 0.0
    for batch in itertools.islice(loader, max_steps):
        images, targets = batch
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss += criterion(logits.float(), targets).item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, :1].sum().item()
        correct5 += hits.sum().item()
        seen += len(targets)
    loss, correct1, correct5, seen, skipped = distributed.all_reduce_sum(
        [loss, correct1, correct5, seen, loader.skipped], device
    )
    n = max(seen, 1)
    return {
        "val_loss": loss / n,
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "val_images": int(seen),
        "val_skipped": int(skipped),  # unreadable images, counted by the loader
    }

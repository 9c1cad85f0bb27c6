"""Resuming a detection run inside an epoch: mmengine's ``EpochBasedTrainLoop`` restarts an epoch at its first
batch, so a checkpoint written after ``k`` iterations of an epoch would train those ``k`` batches twice.

:class:`ResumableEpochLoop` (``train_cfg.type``) starts a resumed epoch at batch ``k``, and
:class:`ResumableBatchSampler` (``train_dataloader.batch_sampler``, wrapping mmdet's ``AspectRatioBatchSampler``
or a plain batch sampler) skips the first ``k`` batches by their indices: the epoch's order comes from the
sampler's seed and epoch (mmengine's ``DefaultSampler``), so the skipped indices are the ones trained before the
stop and no image is loaded for them (mmengine's ``IterBasedTrainLoop`` instead loads every skipped batch).
With ``data.num_workers=0`` the resumed run is bit-exact with an uninterrupted one on the CPU: the RNG states
travel with the checkpoint (:class:`~lbc.detection.hook.SparsityHook`), and the one draw a new DataLoader
iterator makes from torch's generator is undone, as the uninterrupted run made it at the epoch's start. With
workers, the batches are the same but each worker's augmentation stream starts over (mmengine seeds a worker
from ``seed + worker id`` when it starts, not per image).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from mmdet.registry import DATA_SAMPLERS, LOOPS
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import BatchSampler, Sampler

from lbc.engine.checkpoint import rng_state, set_rng_state
from lbc.errors import ConfigError

__all__ = ["ResumableBatchSampler", "ResumableEpochLoop"]


@DATA_SAMPLERS.register_module()
class ResumableBatchSampler(Sampler):
    """``batch_sampler`` (an mmengine batch-sampler config, built with ``sampler`` and ``batch_size``; None: torch's
    ``BatchSampler``) whose next iteration can start ``k`` batches in (:meth:`skip_next`). ``sampler`` is exposed
    so that mmengine's ``DistSamplerSeedHook`` sets its epoch; the length is the whole epoch's."""

    def __init__(self, sampler: Sampler, batch_size: int, batch_sampler: dict | None = None,
                 drop_last: bool = False) -> None:
        self.sampler = sampler
        if batch_sampler is None:
            self.batches: Any = BatchSampler(sampler, batch_size, drop_last=drop_last)
        else:
            self.batches = DATA_SAMPLERS.build(batch_sampler, default_args=dict(sampler=sampler, batch_size=batch_size))
        self._skip = 0

    def skip_next(self, batches: int) -> None:
        """The next iteration starts after its first ``batches`` batches (their indices are drawn, not loaded)."""
        self._skip = batches

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)


@LOOPS.register_module()
class ResumableEpochLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that continues a resumed epoch with the batch after the checkpoint's: a checkpoint
    written inside an epoch (``iter_<n>.pth``, meta ``epoch`` = epochs completed, ``iter`` = iterations completed)
    leaves ``iter - epoch x iterations per epoch`` batches of the epoch done."""

    def run_epoch(self) -> None:
        per_epoch = len(self.dataloader)
        done = self._iter - self._epoch * per_epoch  # batches of this epoch trained before the resumed checkpoint
        if not 0 <= done < per_epoch:
            raise ConfigError(f"the checkpoint resumed from has {self._iter} iterations after {self._epoch} epochs, "
                              f"which does not fit {per_epoch} iterations per epoch (were data or data.batch_size "
                              "changed?); start a new run_dir")
        self.runner.call_hook("before_train_epoch")  # DistSamplerSeedHook: the sampler's epoch, hence its order
        self.runner.model.train()
        batches = self._batches(done)
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1

    def _batches(self, done: int) -> Iterator[Any]:
        """The epoch's batches from batch ``done`` on, without the RNG draw a new iterator makes (``done > 0``:
        the uninterrupted run made it at the epoch's first batch, and the checkpoint's RNG states include it)."""
        if done == 0:
            return iter(self.dataloader)
        sampler = self.dataloader.batch_sampler
        if not isinstance(sampler, ResumableBatchSampler):
            raise ConfigError("resuming inside an epoch needs train_dataloader.batch_sampler="
                              f"ResumableBatchSampler (lbc sets it); it is {type(sampler).__name__}")
        sampler.skip_next(done)
        state = rng_state()
        batches = iter(self.dataloader)
        set_rng_state(state)
        return batches

"""A DataLoader whose order and augmentation randomness are pure functions of (seed, epoch[, rank]).

It is also the one place that counts unreadable images: ``collate`` (in the worker processes, if any)
drops the None items and says how many with the batch; the loader's iterator adds them up in
``loader.skipped`` and never yields an empty batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from lbc.batching import per_process_batch


def epoch_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, epoch): unlike seed + epoch, no two runs share orders."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Collated(NamedTuple):
    """A collated batch (None if every item was unreadable) and how many items were dropped as unreadable."""

    batch: Any
    skipped: int


def collate(items: list[Any]) -> Collated:
    """default_collate of the items that are not None (unreadable images give None), and their shortfall.

    The count travels with the batch because with workers this runs in another process.
    """
    kept = [item for item in items if item is not None]
    return Collated(default_collate(kept) if kept else None, len(items) - len(kept))


class EpochSampler(Sampler[int]):
    """All indices, shuffled by a generator seeded from (seed, epoch) when ``shuffle``; call ``set_epoch``."""

    def __init__(self, data: Sized, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch = len(data), shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


class EpochLoader(DataLoader):
    """A DataLoader with ``set_epoch``: it sets the sampler's order and the augmentation seed for that epoch.

    With workers, each worker seeds torch/random/numpy from ``self.generator`` (seeded per epoch and
    rank) as PyTorch does; without workers the items are made under a private RNG state seeded the
    same way, so augmentation neither depends on nor disturbs the global RNG (the model's dropout).
    Batches go through ``collate``; iterating yields only non-empty batches and counts the unreadable
    images of the epoch being (or last) iterated in ``skipped``, up to the last batch taken.
    """

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int, rank: int, **kwargs: Any) -> None:
        super().__init__(dataset, generator=torch.Generator(), collate_fn=collate, **kwargs)
        self.seed, self.rank, self.skipped = seed, rank, 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.sampler, EpochSampler):
            self.sampler.set_epoch(epoch)
        else:  # DistributedSampler (built with seed=0) and RepeatAugSampler seed their order from this alone
            self.sampler.set_epoch(epoch_seed(self.seed, epoch))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        seed = epoch_seed(self.seed, self.epoch, self.rank, 1)
        self.generator.manual_seed(seed)  # workers' seeds are drawn from it when the iterator starts
        it = super().__iter__()
        self.skipped = 0
        return self._count_skipped(it if self.num_workers > 0 else _private_rng(it, seed))

    def _count_skipped(self, it: Iterator[Collated]) -> Iterator[Any]:
        """Yield the batches of ``it``, adding each one's unreadable images to ``self.skipped``."""
        for batch, skipped in it:
            self.skipped += skipped
            if batch is not None:
                yield batch


def _swap_rng(state: tuple) -> tuple:
    """Install ``state`` as the torch/random/numpy global RNG states; return the ones it replaced."""
    previous = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])
    return previous


def _private_rng(it: Iterator[Any], seed: int) -> Iterator[Any]:
    """Yield from ``it`` with the global RNGs swapped for a private state seeded ``seed`` while it runs."""
    state = (torch.Generator().manual_seed(seed).get_state(), random.Random(seed).getstate(),
             np.random.RandomState(seed).get_state())
    while True:
        outer = _swap_rng(state)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            state = _swap_rng(outer)
        yield batch


def build_loader(
    dataset: Dataset,
    batch_size: int | None,
    train: bool,
    workers: int,
    seed: int,
    epoch: int = 0,
    distributed: bool = False,
    repeated_aug: int = 0,
    drop_last: bool | None = None,
    global_batch_size: int | None = None,
) -> EpochLoader:
    """A loader whose batches for (seed, epoch) are always the same; call ``loader.set_epoch(e)`` each epoch.

    train shuffles (and by default drops the last partial batch); ``distributed`` shards by rank with
    DistributedSampler (val is padded to equal shards, as torch does); ``repeated_aug`` > 0 uses timm's
    RepeatAugSampler with that many repeats (DeiT uses 3; train only). Unreadable images are dropped
    and counted in ``loader.skipped``. The batch is ``batch_size`` per process, or
    ``global_batch_size`` over all processes (:func:`per_process_batch`); ``loader.batch_size`` says which.
    """
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    batch_size = per_process_batch(batch_size, global_batch_size, world)
    sampler: Sampler[int]
    if train and repeated_aug > 0:
        sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, num_repeats=repeated_aug)
    elif distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=0, drop_last=False)
    else:
        sampler = EpochSampler(dataset, shuffle=train, seed=seed)  # type: ignore[arg-type]
    return EpochLoader(
        dataset,
        seed=seed,
        epoch=epoch,
        rank=rank,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # fresh workers each epoch: their seeds follow the epoch
    )

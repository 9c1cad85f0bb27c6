"""A DataLoader whose order and augmentation randomness are pure functions of (seed, epoch[, rank]), per item:
an epoch can begin at any batch (resume inside an epoch) and the worker count changes nothing.

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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
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


class SeededSampler(Sampler[tuple[int, int]]):
    """``sampler``'s indices paired with one augmentation seed per position in the epoch, from ``start`` on.

    The seed of position ``p`` is word ``p`` of ``SeedSequence(seed, epoch, rank, 1)`` (drawn for the
    whole epoch at once, vectorised): what an item's augmentation draws depends only on (seed, epoch,
    rank, position), not on the worker that makes it, how many workers there are, or which items came
    before. So an epoch can begin at any batch (``start``: positions skipped without loading them) and
    give the very batches an uninterrupted epoch gives from there: the resume inside an epoch.
    """

    def __init__(self, sampler: Sampler[int], seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank, self.epoch, self.start = sampler, seed, rank, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.sampler)
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank, 1]).generate_state(max(len(indices), 1))
        return zip(indices[self.start :], seeds[self.start : len(indices)].tolist(), strict=True)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class SeededItems(Dataset):
    """``dataset[index]`` made under the global torch/random/numpy RNGs seeded with the item's seed, then
    given back: augmentation never depends on, nor disturbs, the process's RNG (the model's dropout)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        outer = _rng_states() if get_worker_info() is None else None  # a worker's RNG serves nothing else
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            if outer is not None:
                _set_rng_states(outer)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class EpochLoader(DataLoader):
    """A DataLoader with ``set_epoch``: it sets the sampler's order and the items' augmentation seeds.

    Each item is made under RNGs seeded from (seed, epoch, rank, its position in the epoch)
    (:class:`SeededSampler`): the batches are the same with 0 or N workers, and ``set_epoch(e,
    start=k)`` begins epoch ``e`` at its batch ``k`` with exactly the batches an uninterrupted epoch
    would give there (a resume inside the epoch; the loader's whole state is (epoch, batch)). Batches
    go through ``collate``; iterating yields only non-empty batches and counts the unreadable images of
    the epoch being (or last) iterated in ``skipped``, up to the last batch taken.
    """

    def __init__(self, dataset: Dataset, *, sampler: Sampler[int], seed: int, epoch: int, rank: int,
                 **kwargs: Any) -> None:
        self.order = sampler  # the indices' order (EpochSampler, DistributedSampler or RepeatAugSampler)
        super().__init__(SeededItems(dataset), sampler=SeededSampler(sampler, seed, rank),
                         generator=torch.Generator().manual_seed(seed), collate_fn=collate, **kwargs)
        self.seed, self.rank, self.skipped, self.start = seed, rank, 0, 0
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch ``epoch``'s order and seeds, beginning at its batch ``start`` (0: the whole epoch)."""
        if start < 0 or start > len(self):
            raise ValueError(f"start={start} is outside the epoch's {len(self)} batches")
        self.epoch, self.start = epoch, start
        self.sampler.epoch, self.sampler.start = epoch, start * self.batch_size  # type: ignore[attr-defined]
        if isinstance(self.order, EpochSampler):
            self.order.set_epoch(epoch)
        else:  # DistributedSampler (built with seed=0) and RepeatAugSampler seed their order from this alone
            self.order.set_epoch(epoch_seed(self.seed, epoch))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.skipped = 0
        return self._count_skipped(super().__iter__())

    def _count_skipped(self, it: Iterator[Collated]) -> Iterator[Any]:
        """Yield the batches of ``it``, adding each one's unreadable images to ``self.skipped``."""
        for batch, skipped in it:
            self.skipped += skipped
            if batch is not None:
                yield batch


def _rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


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
        persistent_workers=False,
    )

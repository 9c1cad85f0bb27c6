"""Batches are a pure function of (seed, epoch): same order and augmentation again, new order next epoch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch.utils.data import Dataset

from lbc.data import build_datasets, build_loader, collate
from lbc.data.loader import epoch_seed


class Noisy(Dataset):
    """Item i is (i + torch noise + python-random noise, i): exposes both the order and the augmentation RNG."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]) + torch.rand(1) + random.random(), i


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_and_epoch_give_the_same_batches(workers):
    a = build_loader(Noisy(), batch_size=4, train=True, workers=workers, seed=3)
    b = build_loader(Noisy(), batch_size=4, train=True, workers=workers, seed=3, epoch=5)
    first = _epoch(a)
    torch.manual_seed(123), random.seed(123)  # the global RNG state must not matter
    assert _same(first, _epoch(a))  # the same epoch again
    a.set_epoch(5)
    assert _same(_epoch(a), _epoch(b))  # set_epoch(5) == built at epoch 5 (resume)
    a.set_epoch(6)
    sixth = _epoch(a)
    assert [y.tolist() for _, y in sixth] != [y.tolist() for _, y in first]  # a new order each epoch
    assert sorted(sum((y.tolist() for _, y in sixth), [])) == list(range(20))  # a permutation (drop_last: 20 % 4 == 0)


def test_seed_changes_the_order_and_val_is_in_order():
    a = [y.tolist() for _, y in build_loader(Noisy(), batch_size=20, train=True, workers=0, seed=0)]
    b = [y.tolist() for _, y in build_loader(Noisy(), batch_size=20, train=True, workers=0, seed=1)]
    assert a != b
    val = build_loader(Noisy(), batch_size=8, train=False, workers=0, seed=0)
    assert [y.tolist() for _, y in val] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert val.skipped == 0 and not val.drop_last


def test_train_drops_the_last_partial_batch_by_default():
    loader = build_loader(Noisy(), batch_size=8, train=True, workers=0, seed=0)
    assert [len(y) for _, y in loader] == [8, 8] and len(loader) == 2


def test_loading_leaves_the_global_rng_alone_without_workers():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(build_loader(Noisy(), batch_size=4, train=True, workers=0, seed=0))
    assert torch.equal(torch.rand(3), expected)


def test_repeated_aug_repeats_each_sample():
    # timm's RepeatAugSampler keeps an epoch at len(dataset) samples: 20 = six samples x 3 repeats + 2.
    loader = build_loader(Noisy(), batch_size=20, train=True, workers=0, seed=0, repeated_aug=3, drop_last=False)
    labels = next(iter(loader))[1].tolist()
    assert len(labels) == 20
    assert [labels[i : i + 3] for i in range(0, 18, 3)] == [[y] * 3 for y in labels[0:18:3]]
    assert len(set(labels)) == 7
    again = build_loader(Noisy(), batch_size=20, train=True, workers=0, seed=0, repeated_aug=3, drop_last=False)
    assert next(iter(again))[1].tolist() == labels


def test_collate_drops_none_items_and_counts_them():
    (x, y), skipped = collate([None, (torch.zeros(2), 1), None, (torch.ones(2), 2)])
    assert x.shape == (2, 2) and y.tolist() == [1, 2] and skipped == 2
    assert collate([None, None]) == (None, 2)


class Holes(Noisy):
    """Noisy, but items 4-7 (one whole batch of 4 in order) and 13 are unreadable (None)."""

    def __getitem__(self, i: int):
        return None if 4 <= i < 8 or i == 13 else super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_drops_and_counts_unreadable_items(workers):
    val = build_loader(Holes(), batch_size=4, train=False, workers=workers, seed=0)
    labels = [y.tolist() for _, y in val]
    assert labels == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 14, 15], [16, 17, 18, 19]]  # no empty batch
    assert val.skipped == 5
    assert len(list(itertools.islice(val, 2))) == 2 and val.skipped == 4  # only what was taken, reset per pass


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_keeps_batches_a_function_of_seed_and_epoch(workers):
    a = build_loader(Holes(), batch_size=4, train=True, workers=workers, seed=3, epoch=2)
    b = build_loader(Holes(), batch_size=4, train=True, workers=workers, seed=3, epoch=2)
    first = _epoch(a)
    assert _same(first, _epoch(b)) and _same(first, _epoch(a)) and a.skipped == b.skipped
    assert sum(len(y) for _, y in first) + a.skipped == 20  # drop_last: 20 % 4 == 0, nothing else lost


def test_epoch_seed_does_not_collide_like_seed_plus_epoch():
    assert epoch_seed(0, 1) != epoch_seed(1, 0) and epoch_seed(2, 3) == epoch_seed(2, 3)


def test_synthetic_is_deterministic_per_index_and_shaped():
    ds = build_datasets("synthetic", input_size=[3, 8, 8], num_classes=5, train_size=6, val_size=4, seed=7)
    again = build_datasets("synthetic", input_size=[3, 8, 8], num_classes=5, train_size=6, val_size=4, seed=7)
    assert (len(ds.train), len(ds.val), ds.num_classes, ds.input_size) == (6, 4, 5, (3, 8, 8))
    for i in (5, 0, 3):  # any access order
        assert torch.equal(ds.train[i][0], again.train[i][0]) and ds.train[i][1] == again.train[i][1]
    assert ds.train[0][0].shape == (3, 8, 8) and 0 <= ds.train[0][1] < 5
    assert not torch.equal(ds.train[0][0], ds.train[1][0])
    assert not torch.equal(ds.train[0][0], ds.val[0][0])
    with pytest.raises(IndexError):
        ds.train[6]


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("repeated_aug", [0, 3])
def test_distributed_samplers_follow_seed_and_epoch(one_process_group, repeated_aug):
    def order(seed, epoch):
        loader = build_loader(Noisy(), batch_size=20, train=True, workers=0, seed=seed, epoch=epoch,
                              distributed=True, repeated_aug=repeated_aug)
        return next(iter(loader))[1].tolist()

    assert order(0, 2) == order(0, 2) and order(0, 2) != order(0, 3) and order(0, 2) != order(1, 2)
    if not repeated_aug:
        assert sorted(order(0, 2)) == list(range(20))

"""The digits data set: fixed stratified 1437/360 split of all 1797 images, 3x32x32, normalised."""

from __future__ import annotations

import pytest
import torch

from lbc.data import build_datasets
from lbc.data.digits import digits_split
from lbc.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return build_datasets("digits", num_classes=10, input_size=[3, 32, 32])


def _all(ds):
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_sizes_shapes_and_classes(digits):
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert digits.num_classes == 10 and digits.input_size == (3, 32, 32)
    for ds in (digits.train, digits.val):
        images, labels = _all(ds)
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert torch.equal(images[:, 0], images[:, 2])  # grey repeated to 3 channels
        assert set(labels.tolist()) == set(range(10))
    train_images, _ = _all(digits.train)
    assert train_images.mean().abs() < 1e-4 and (train_images.std() - 1).abs() < 1e-3


def test_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    train, val = digits_split(labels)
    assert (train, val) == digits_split(labels)
    assert not set(train) & set(val) and sorted(train + val) == list(range(1797))
    assert train[:5] == [0, 1, 2, 3, 4] and val[:5] == [21, 24, 28, 34, 35]  # the split must not change between machines or releases


def test_two_builds_give_identical_data(digits):
    again = build_datasets("digits")
    for a, b in ((digits.train, again.train), (digits.val, again.val)):
        assert torch.equal(_all(a)[0], _all(b)[0]) and torch.equal(_all(a)[1], _all(b)[1])


def test_image_size_and_augmentation_flag():
    ds = build_datasets("digits", image_size=16, train_augment=True)
    assert ds.input_size == (3, 16, 16) and ds.train[0][0].shape == (3, 16, 16)
    torch.manual_seed(0)
    a = ds.train[0][0]
    assert not torch.equal(a, ds.train[0][0])  # random affine differs per draw
    assert torch.equal(ds.val[0][0], ds.val[0][0])  # val is never augmented


def test_declared_facts_that_disagree_are_config_errors():
    with pytest.raises(ConfigError, match="data.num_classes=100"):
        build_datasets("digits", num_classes=100)
    with pytest.raises(ConfigError, match="data.input_size"):
        build_datasets("digits", image_size=32, input_size=[3, 64, 64])


def test_unknown_data_set_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.name='mnist'.*digits"):
        build_datasets("mnist")

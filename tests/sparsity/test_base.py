"""The attach machinery: one method at a time, the cached float masks (layer selection: test_selection.py)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.base import float_view


def test_float_view_follows_in_place_changes_and_copies():
    holder = nn.Module()
    holder.register_buffer("mask", torch.ones(4, dtype=torch.bool))
    first = float_view(holder, "mask", torch.float32)
    assert float_view(holder, "mask", torch.float32) is first  # cached while unchanged
    holder.mask[1] = False
    assert float_view(holder, "mask", torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0]
    twin = copy.deepcopy(holder)
    twin.mask.copy_(torch.tensor([False, True, True, True]))
    assert float_view(twin, "mask", torch.float32).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert float_view(holder, "mask", torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0]
    holder.load_state_dict({"mask": torch.tensor([True, True, False, False])})
    assert float_view(holder, "mask", torch.float64).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_attaching_twice_is_refused_until_detached():
    model = torchvision.models.resnet18()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_f=2)
    with pytest.raises(ConfigError, match="already has a reparametrised weight") as err:
        lbc.sparsify(model, method="srste", pattern="2:4")
    assert "\n" not in str(err.value)
    sp.detach()
    again = lbc.sparsify(model, method="srste", pattern="2:4")
    assert again.is_exact_nm()

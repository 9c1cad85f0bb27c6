"""Training FLOPs (paper Table 1, "FLOPs (Train)"): the meter on hand-made timelines, and its costs."""

import pytest
import torch
from torch import nn

import lbc
from lbc.flops import TrainingFlops, layer_costs


def _meter(unit_cost=lambda d: d):
    return TrainingFlops({"a": 1.0, "b": 3.0}, unit_cost)


def test_step_cost_weights_layers_by_their_cost():
    meter = _meter()
    assert meter.step_cost({"a": 1.0, "b": 1.0}) == 1.0
    assert meter.step_cost({"a": 1.0, "b": 0.5}) == (1.0 + 1.5) / 4
    srste = _meter(lambda d: (d + 2.0) / 3.0)  # sparse forward, dense backward
    assert srste.step_cost({"a": 0.5, "b": 0.5}) == pytest.approx(0.8333, abs=1e-4)  # Table 1's 0.83x


def test_integral_of_a_hand_made_timeline():
    meter = _meter()
    meter.record(0.0, {"a": 1.0, "b": 1.0})  # cost 1 on [0, 2)
    meter.record(2.0, {"a": 1.0, "b": 0.5})  # 0.625 on [2, 3)
    meter.record(3.0, {"a": 0.5, "b": 0.5})  # 0.5 from 3 on
    assert meter.timeline == [(0.0, 1.0), (2.0, 0.625), (3.0, 0.5)]
    assert meter.train_flops_ratio(0.0) == 1.0  # nothing spent yet: the first step's cost
    assert meter.train_flops_ratio(1.0) == 1.0
    assert meter.train_flops_ratio(2.5) == (2.0 + 0.5 * 0.625) / 2.5
    assert meter.train_flops_ratio(4.0) == (2.0 + 0.625 + 0.5) / 4.0
    meter.record(3.0, {"a": 0.25, "b": 0.25})  # the same epoch again: the cost is replaced, not added
    assert meter.timeline == [(0.0, 1.0), (2.0, 0.625), (3.0, 0.25)]
    assert meter.train_flops_ratio(4.0) == (2.0 + 0.625 + 0.25) / 4.0


def test_state_dict_round_trip():
    meter = _meter()
    meter.record(0.0, {"a": 1.0, "b": 1.0})
    meter.record(1.5, {"a": 0.5, "b": 0.5})
    state = meter.state_dict()
    assert state == {"cost_timeline": [(0.0, 1.0), (1.5, 0.5)]}
    other = _meter()
    other.load_state_dict({"cost_timeline": [list(x) for x in state["cost_timeline"]]})  # as JSON gives it back
    assert other.timeline == meter.timeline and other.train_flops_ratio(3.0) == 0.75


def test_layer_costs_are_macs_or_weight_counts():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 2), nn.Linear(2, 2))
    assert layer_costs(model) == {"0": 288.0, "2": 400.0, "3": 4.0}
    assert layer_costs(model, (4, 5, 5)) == {"0": 288.0 * 25, "2": 400.0, "3": 4.0}


def test_a_method_keeps_its_figures_in_the_meter():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=["0"], t_i=0, t_f=1, input_size=(8, 4, 4))
    assert isinstance(sp.flops, TrainingFlops) and sp.layer_cost == sp.flops.layer_cost
    sp.update(1)  # exactly 2:4 in layer "1": half its cost; layer "0" is dense and costs the same
    assert sp.step_cost() == 0.75
    sp.update(2)
    assert sp.state_dict()["cost_timeline"] == sp.flops.timeline == [(0.0, 1.0), (1.0, 0.75)]
    assert sp.train_flops_ratio() == sp.flops.train_flops_ratio(2.0) == (1.0 + 0.75) / 2
    assert sp.report()["scalars"]["train_flops_ratio"] == 0.875
    assert torch.equal(sp.masks()["1.weight"].sum(), torch.tensor(8 * 8 * 9 / 2))

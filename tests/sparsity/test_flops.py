"""Training FLOPs (paper Table 1, "FLOPs (Train)"): the meter on hand-made timelines, and its costs."""

import json

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
    other.load_state_dict(json.loads(json.dumps(state)))  # as JSON gives it back
    assert other.timeline == meter.timeline and other.train_flops_ratio(3.0) == 0.75


def test_measured_costs_reweight_the_whole_timeline_and_survive_a_round_trip():
    meter = TrainingFlops({"a": 1.0, "b": 3.0}, lambda d: d, measure_later=True)
    meter.record(0.0, {"a": 1.0, "b": 1.0})
    meter.record(1.0, {"a": 1.0, "b": 0.5})
    assert meter.timeline == [(0.0, 1.0), (1.0, (1.0 + 1.5) / 4)]
    meter.set_layer_cost({"a": 3.0, "b": 1.0})  # measured later: the earlier entries follow
    assert meter.timeline == [(0.0, 1.0), (1.0, (3.0 + 0.5) / 4)]
    other = TrainingFlops({"a": 1.0, "b": 3.0}, lambda d: d, measure_later=True)
    other.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    assert other.measured and other.layer_cost == {"a": 3.0, "b": 1.0} and other.timeline == meter.timeline


class _TwoInputs(nn.Module):
    """A model no made-up tensor can run: it takes a dict, and calls a shared head twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, batch):
        x = self.stem(batch["image"])
        return self.head(x).sum() + self.head(x[..., ::2, ::2]).sum()


def test_without_an_input_size_the_first_forward_measures_each_layer():
    model = _TwoInputs()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", input_size="first_forward", exclude=[])
    assert sp.layer_cost == {"stem": 8 * 3 * 9, "head": 64}  # weight counts until a forward ran
    sp.update(0)  # prunes both layers: the timeline holds densities, not yet costs
    model({"image": torch.zeros(2, 3, 8, 8)})
    # MACs of the forward: stem 2 images x 4x4 outputs x 8 channels x 27; head 2 x (16 + 4) x 8 x 8
    assert sp.layer_cost == {"stem": 2 * 16 * 8 * 27, "head": 2 * 20 * 8 * 8}
    stem, head = 2 * 16 * 8 * 27, 2 * 20 * 8 * 8  # the stem's 3 input channels cannot be 2:4: dense
    assert sp.flops.measured and sp.step_cost() == pytest.approx((stem + 0.5 * head) / (stem + head))
    model({"image": torch.zeros(1, 3, 16, 16)})  # measured once: later forwards change nothing
    assert sp.layer_cost == {"stem": 2 * 16 * 8 * 27, "head": 2 * 20 * 8 * 8}
    assert not model.stem._forward_hooks and not model._forward_hooks  # the probe removed itself


def test_a_copy_of_a_probed_model_does_not_count_twice():
    import copy

    model = _TwoInputs()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], input_size="first_forward")
    twin = copy.deepcopy(model)  # EMA copies the model with its hooks
    model({"image": torch.zeros(1, 3, 8, 8)})
    measured = dict(sp.layer_cost)
    twin({"image": torch.zeros(4, 3, 32, 32)})
    assert sp.layer_cost == measured


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


def test_a_probed_method_resumes_with_its_measured_costs():
    model = _TwoInputs()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], input_size="first_forward")
    sp.update(0)
    model({"image": torch.zeros(1, 3, 8, 8)})
    state = json.loads(json.dumps(sp.state_dict()))
    fresh = _TwoInputs()
    again = lbc.sparsify(fresh, method="asp", pattern="2:4", exclude=[], input_size="first_forward")
    again.load_state_dict(state)
    assert again.layer_cost == sp.layer_cost and again.flops.timeline == sp.flops.timeline
    fresh({"image": torch.zeros(3, 3, 32, 32)})  # resumed: not measured again on other images
    assert again.layer_cost == sp.layer_cost

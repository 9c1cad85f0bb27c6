"""Every registered method gets these for free: N:M invariant, state dict, deepcopy, EMA, detach."""

import copy

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.utils import parametrize

import lbc
from lbc.sparsity import METHODS
from lbc.sparsity.base import stored_weight
from lbc.sparsity.nm import is_nm, topn_mask

# Options that put each method in its final state by epoch 3; a new method must add itself here.
OPTIONS = {
    "dense": {},
    "lbc": {"t_i": 0, "t_f": 2},
    "srste": {},
    "asp": {"dense_epochs": 1, "finetune_epochs": 2},
    "magnitude": {},  # the one-shot methods: their masks come from start_from (lbc.lm.calibrate in task=lm)
    "wanda": {},
    "sparsegpt": {},
}
FINAL_EPOCH = 3


def test_every_registered_method_is_covered():
    assert set(OPTIONS) == set(METHODS.names())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.hidden = nn.Linear(16, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn(self.conv(torch.relu(self.stem(x)))).mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def _build(method: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    sp = lbc.sparsify(model, method=method, pattern="2:4", **OPTIONS[method])
    if sp.prior is not None:  # a one-shot method: start it from a one-shot mask, as the lm runner does
        sp.start_from({name: topn_mask(stored_weight(layer), sp.pattern) for name, layer in sp.layers.items()})
    return model, sp


def _steps(model, sp, epochs=FINAL_EPOCH, steps=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    own = {id(p) for p in sp.score_parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in own]}] + sp.param_groups(1e-4)
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(epochs * steps):
        sp.update(step / steps)
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 6, 6, generator=gen)),
                                    torch.randint(0, 10, (4,), generator=gen)).backward()
        opt.step()
    sp.update(epochs)
    return opt


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_default_layers_and_final_pattern(method):
    model, sp = _build(method)
    assert set(sp.layers) == {"conv", "hidden"}  # stem (3 inputs) and classifier stay dense
    _steps(model, sp)
    report = sp.report()
    if method == "dense":
        assert sp.masks() == {} and report["scalars"]["density"] == 1.0
        assert report["scalars"]["train_flops_ratio"] == 1.0
        return
    for name in sp.layers:
        assert is_nm(model.get_submodule(name).weight, sp.pattern)
    assert sp.is_exact_nm() and report["scalars"]["exact_nm"] == 1.0
    assert set(sp.masks()) == {"conv.weight", "hidden.weight"}
    assert 0 < report["scalars"]["train_flops_ratio"] < 1.0
    sp.finalize()


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_dense_state_dict_keys_and_round_trip(method):
    model, sp = _build(method)
    keys = set(Net().state_dict())
    assert keys <= set(model.state_dict())  # the dense weights keep their own keys
    _steps(model, sp, epochs=2)
    clone, sp2 = _build(method, seed=1)
    clone.load_state_dict(model.state_dict())
    sp2.load_state_dict(sp.state_dict())
    x = torch.randn(2, 3, 6, 6)
    model.eval(), clone.eval()
    assert torch.equal(model(x), clone(x))
    assert sp.report()["scalars"] == sp2.report()["scalars"]


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_deepcopy_and_ema_follow_the_mask(method):
    model, sp = _build(method)
    ema = ModelEmaV3(model, decay=0.5)
    twin = copy.deepcopy(model)
    _steps(model, sp)
    ema.update(model)
    x = torch.randn(2, 3, 6, 6)
    model.eval(), twin.eval()
    assert not torch.equal(model(x), twin(x))  # the copy is independent of the original
    for name in sp.layers:
        mine, theirs = model.get_submodule(name), ema.module.get_submodule(name)
        if parametrize.is_parametrized(mine, "weight"):
            mask = mine.parametrizations.weight[0].mask
            assert mask.dtype == torch.bool  # EMA copies non-float buffers instead of averaging
            assert torch.equal(theirs.parametrizations.weight[0].mask, mask)
            assert is_nm(theirs.weight, sp.pattern)


@pytest.mark.parametrize("method", sorted(set(OPTIONS) - {"dense"}))
def test_detach_bakes_the_mask_into_plain_weights(method):
    model, sp = _build(method)
    _steps(model, sp)
    x = torch.randn(2, 3, 6, 6)
    model.eval()
    before = model(x)
    sp.detach()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == set(Net().state_dict())
    torch.testing.assert_close(model(x), before)
    assert is_nm(model.conv.weight, sp.pattern) and is_nm(model.hidden.weight, sp.pattern)


# What each method carries into another model with its masks (a classification checkpoint into a detector's
# backbone, lbc/detection/backbone.py): its place on the schedule, nothing else; a new method adds itself here.
CARRIED = {"dense": set(), "lbc": {"removed"}, "srste": set(), "asp": {"pruned"}, "magnitude": {"pruned"},
           "wanda": {"pruned"}, "sparsegpt": {"pruned"}}


def test_every_registered_method_says_what_it_carries():
    assert set(CARRIED) == set(METHODS.names())


@pytest.mark.parametrize("method", sorted(CARRIED))
def test_carry_in_takes_the_schedule_place_and_keeps_the_masks(method):
    model, sp = _build(method)
    _steps(model, sp)  # the source at its final state (LBC after t_f, ASP pruned)
    state = sp.state_dict()
    assert set(type(sp).carried_state(state)) == CARRIED[method]
    target_model, target = _build(method, seed=1)  # a fresh method at epoch 0
    target_model.load_state_dict(model.state_dict())  # the masks (and LBC's scores) as load_backbone loads them
    carried = target.carry_in(state)
    assert carried == {k: state[k] for k in CARRIED[method]}
    assert all(target.state_dict()[k] == v for k, v in carried.items())
    assert target.epoch == 0.0  # the target's own epoch and cost timeline ...
    assert target.flops.timeline[-1] == (0.0, target.step_cost())  # ... which notes the masks it now has
    masks = {k: v.clone() for k, v in sp.masks().items()}
    for epoch in (0, 1, FINAL_EPOCH, 10):  # nothing is removed or pruned again
        target.update(epoch)
        assert target.masks().keys() == masks.keys() and all(torch.equal(target.masks()[k], v) for k, v in masks.items())
    assert target.carry_in(None) == {}  # masks kept, the schedule starts fresh: only the cost is noted


def test_carried_mask_is_the_buffer_except_for_srste():
    """SR-STE's forward takes the top-N of the current weight, so another model starts from that, not from the
    mask buffer of the last training step; the others' masks are their buffers."""
    from lbc.sparsity.nm import NMPattern, topn_mask

    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    stale = torch.ones(8, 16, dtype=torch.bool)
    pattern = NMPattern(2, 4)
    for method in METHODS.names():
        got = METHODS.get(method).carried_mask(weight, stale, pattern)
        assert torch.equal(got, topn_mask(weight, pattern) if method == "srste" else stale), method

"""Folding a fixed mask into the stored weight (``MaskParametrization``): same model, no forward multiply.

A folded layer's training forward uses the stored weight as it is, so the promise is that its
pruned entries stay exact zeros under every optimizer that can keep them (the optimizer state is
masked once, before the next step), and that the effective weights train bit for bit as with the
multiply. Where the promise cannot hold (factored optimizer state, frozen or hand-written weights),
the layer multiplies again.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lbc
from lbc.sparsity.base import MaskParametrization, stored_weight


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


METHODS = {
    "asp": {"method": "asp", "dense_epochs": 1, "finetune_epochs": 2},
    "lbc": {"method": "lbc", "t_i": 0, "t_f": 2, "update_every": "step"},
}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}


def _unfolded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every layer multiply (the reference): folding refuses, as for a frozen weight."""
    def no_fold(self: MaskParametrization, weight: nn.Parameter) -> None:
        self.folded = False
        with torch.no_grad():
            weight.mul_(self.mask.to(weight.dtype))  # what the unfolded methods do at a prune
    monkeypatch.setattr(MaskParametrization, "fold", no_fold)


def _train(method: str, optimizer: str, steps: int = 12) -> tuple[nn.Module, lbc.SparsityMethod, list]:
    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, exclude=[], pattern="2:4", **METHODS[method])
    own = {id(p) for p in sp.score_parameters()}
    params = [p for p in model.parameters() if id(p) not in own]
    opt = OPTIMIZERS[optimizer]([{"params": params}, *sp.param_groups(1e-2)])
    gen = torch.Generator().manual_seed(1)
    effective = []
    for step in range(steps):
        sp.update(step / 4)
        x = torch.randn(4, 8, 5, 5, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            model.eval()
            effective.append({n: model.get_submodule(n).weight.clone() for n in sp.layers})
            model.train()
    return model, sp, effective


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_folded_layers_train_bit_for_bit_as_multiplied_ones(method, optimizer, monkeypatch):
    model, sp, folded = _train(method, optimizer)
    assert all(model.get_submodule(n).parametrizations.weight[0].folded for n in sp.layers)
    for name in sp.layers:  # pruned stored entries are exact zeros: the optimizer state was masked
        layer = model.get_submodule(name)
        assert bool((stored_weight(layer)[~layer.parametrizations.weight[0].mask] == 0).all()), name
    assert sp.is_exact_nm()
    with monkeypatch.context() as patch:
        _unfolded(patch)
        reference_model, reference_sp, reference = _train(method, optimizer)
    assert not any(reference_model.get_submodule(n).parametrizations.weight[0].folded for n in reference_sp.layers)
    for step, (got, expected) in enumerate(zip(folded, reference, strict=True)):
        for name in got:
            assert torch.equal(got[name], expected[name]), (step, name)


def test_a_factored_optimizer_state_unfolds_the_layer_and_the_forward_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    sp = lbc.sparsify(model, "asp", exclude=[], dense_epochs=1, finetune_epochs=1)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    x = torch.randn(4, 16)
    for step in range(6):
        sp.update(step / 2)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    states = [model.get_submodule(n).parametrizations.weight[0] for n in sp.layers]
    assert not any(state.folded for state in states)  # Adafactor's row/column moments cannot be masked
    for name, state in zip(sp.layers, states, strict=True):
        effective = model.get_submodule(name).weight  # training mode
        assert bool((effective[~state.mask] == 0).all()), name
    sp.update(3)  # an unfolded layer's stored zeros are restored by update, as before folding existed
    assert all(bool((stored_weight(model.get_submodule(n))[~s.mask] == 0).all()) for n, s in zip(sp.layers, states, strict=True))


def test_loading_weights_that_hold_no_zeros_refolds():
    model, sp, _ = _train("asp", "sgd", steps=6)
    dense = Net()
    state = model.state_dict()
    state.update({k: dense.state_dict()[k] for k in ("conv.weight", "fc.weight")})  # no zeros anywhere
    model.load_state_dict(state)
    for name in sp.layers:
        layer = model.get_submodule(name)
        mask = layer.parametrizations.weight[0].mask
        assert layer.parametrizations.weight[0].folded
        assert bool((stored_weight(layer)[~mask] == 0).all()), name
        assert torch.equal(stored_weight(layer)[mask], dense.get_submodule(name).weight[mask])


def test_frozen_released_and_gradient_layers_are_not_folded():
    torch.manual_seed(0)
    frozen = Net()
    frozen.fc.weight.requires_grad_(False)
    before = frozen.fc.weight.detach().clone()
    sp = lbc.sparsify(frozen, "asp", exclude=[], dense_epochs=0)
    sp.update(0)
    assert not frozen.fc.parametrizations.weight[0].folded and frozen.conv.parametrizations.weight[0].folded
    assert torch.equal(frozen.fc.parametrizations.weight.original, before * frozen.fc.parametrizations.weight[0].mask)
    for options in ({"removal": "released"}, {"criterion": "gradient"}, {"train_weights": False}):
        model = Net()
        sp = lbc.sparsify(model, "lbc", exclude=[], t_i=0, t_f=1, **options)
        stored = copy.deepcopy(stored_weight(model.fc).detach())
        sp.update(1)
        state = model.fc.parametrizations.weight[0]
        assert not state.folded, options
        assert not state.mask.all() and torch.equal(stored_weight(model.fc), stored), options  # stored as they were


def test_the_masked_gradient_is_right_for_broadcast_and_double_backward_gradients():
    """The backward masks the incoming gradient in place only when it is the layer's own: a broadcast
    gradient (``weight.sum()``) or one that is part of a graph (``create_graph``) is masked out of place."""
    from lbc.sparsity.base import masked_gradient

    layer = nn.Linear(8, 4)
    sp = lbc.sparsify(layer, "asp", exclude=[], dense_epochs=0)
    sp.update(0)
    mask = layer.parametrizations.weight[0].mask
    layer.weight.sum().backward()  # d/dW of a sum: an expanded (read-only) tensor of ones
    assert torch.equal(stored_weight(layer).grad, mask.float())
    stored_weight(layer).grad = None
    (grad,) = torch.autograd.grad(layer.weight.square().sum(), stored_weight(layer), create_graph=True)
    assert grad.requires_grad and torch.equal(grad.detach(), 2 * stored_weight(layer).detach() * mask)
    own = torch.randn(4, 8)
    with torch.no_grad():  # as in a backward without create_graph
        assert masked_gradient(own, mask.float()) is own  # the layer's own gradient: masked in place
        assert masked_gradient(own, None) is own
        spread = torch.ones(()).expand(4, 8)
        masked = masked_gradient(spread, mask.float())
        assert masked is not spread and torch.equal(masked, mask.float())
    kept = own.clone()
    assert masked_gradient(own, mask.float()) is not own and torch.equal(own, kept)  # grad mode: out of place


def test_a_folded_model_that_is_gone_leaves_nothing_for_later_optimizer_steps():
    import gc

    from lbc.sparsity import base

    model = nn.Linear(8, 4)
    sp = lbc.sparsify(model, "asp", exclude=[], dense_epochs=0)
    sp.update(0)  # folds: the weight waits for an optimizer step to mask its state
    key = id(stored_weight(model))
    assert key in base._PENDING_STATE
    del model, sp
    gc.collect()
    other = nn.Linear(2, 2)
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # any optimizer's step clears what is gone
    assert key not in base._PENDING_STATE

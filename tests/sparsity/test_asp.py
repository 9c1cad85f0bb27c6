"""ASP: dense phase, one-shot magnitude prune (== torch.ao WeightNormSparsifier), masked fine-tuning."""

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.nm import NMPattern, is_nm, topn_mask


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8", "1:16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_mask_equals_weight_norm_sparsifier(pattern, seed):
    p = lbc.parse_pattern(pattern)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 24), nn.Linear(24 * 2, 8))
    weights = [layer.weight.detach().clone() for layer in model]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, p.m), zeros_per_block=p.m - p.n)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    reference = model[0].parametrizations.weight[0].mask.bool()
    assert torch.equal(topn_mask(weights[0], p), reference)

    # and the method's prune gives the same mask
    layer = nn.Linear(32, 24)
    with torch.no_grad():
        layer.weight.copy_(weights[0])
    sp = lbc.sparsify(layer, method="asp", pattern=pattern, exclude=[], dense_epochs=0)
    assert torch.equal(layer.parametrizations.weight[0].mask, reference)
    assert sp.is_exact_nm()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _steps(model, opt, count, seed, sp=None, epoch=0.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        if sp is not None:
            sp.update(epoch)
        opt.zero_grad()
        model(torch.randn(4, 8, 5, 5, generator=gen)).pow(2).mean().backward()
        opt.step()


def _pruned(layer):
    return ~layer.parametrizations.weight[0].mask


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_pruned_weights_stay_zero_through_momentum_and_weight_decay(optim):
    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    _steps(model, opt, 10, seed=0, sp=sp, epoch=0.5)  # dense phase: builds momentum on every weight
    assert not sp.pruned and sp.report()["scalars"]["exact_nm"] == 0.0
    sp.update(1.0)
    assert sp.pruned and sp.is_exact_nm()
    mask_before = {n: m.clone() for n, m in sp.masks().items()}
    for layer in (model.conv, model.fc):
        assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()  # stored zeroed at the prune
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(4, 8, 5, 5, generator=gen)).pow(2).mean().backward()
        for layer in (model.conv, model.fc):
            assert (layer.parametrizations.weight.original.grad[_pruned(layer)] == 0).all()  # masked gradient
        opt.step()
        for layer in (model.conv, model.fc):
            assert (layer.weight[_pruned(layer)] == 0).all()  # effective weight: exactly zero, every step
        sp.update(1.5)  # the trainer's per-step call re-zeroes the stored weights
        for layer in (model.conv, model.fc):
            assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()
    assert sp.masks().keys() == mask_before.keys()
    assert all(torch.equal(sp.masks()[n], m) for n, m in mask_before.items())  # mask fixed
    sp.finalize()
    assert is_nm(model.state_dict()["conv.weight"], NMPattern(2, 4))  # checkpoints hold zeros too
    sp.detach()
    assert is_nm(model.conv.weight, NMPattern(2, 4)) and is_nm(model.fc.weight, NMPattern(2, 4))


def test_prune_at_start_keeps_stored_zeros_without_any_update_call():
    torch.manual_seed(0)
    model = Net()
    lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0, finetune_epochs=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _steps(model, opt, 30, seed=0)
    for layer in (model.conv, model.fc):
        assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()
        assert (layer.weight[_pruned(layer)] == 0).all()


def test_update_prunes_once_and_records_the_cost():
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=2, finetune_epochs=2)
    assert sp.milestones() == {"dense": 2}
    assert sp.phases() == [("dense", 2), ("finetune", 2)]
    sp.update(1.9)
    assert not sp.pruned
    sp.update(2.0)
    mask = model.conv.parametrizations.weight[0].mask.clone()
    with torch.no_grad():
        model.conv.parametrizations.weight.original.mul_(torch.rand_like(mask, dtype=torch.float))
    sp.update(3.0)  # idempotent: no second prune on changed weights
    assert torch.equal(model.conv.parametrizations.weight[0].mask, mask)
    sp.update(4.0)
    assert sp.train_flops_ratio() == pytest.approx((2 * 1.0 + 2 * 0.5) / 4)
    state = sp.state_dict()
    assert state["pruned"] is True


def test_init_from_loads_weights_and_prunes_at_epoch_0(tmp_path):
    torch.manual_seed(0)
    dense = Net()
    torch.save({"model": dense.state_dict(), "epoch": 3}, tmp_path / "dense.pt")
    torch.manual_seed(1)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=5, finetune_epochs=4,
                      init_from=str(tmp_path / "dense.pt"))
    assert sp.dense_epochs == 0 and sp.pruned and sp.is_exact_nm()
    assert sp.milestones() == {} and sp.phases() == [("finetune", 4)]
    expected = dense.conv.weight.detach() * topn_mask(dense.conv.weight.detach(), NMPattern(2, 4))
    assert torch.equal(model.conv.weight, expected)
    torch.save(dense.state_dict(), tmp_path / "plain.pt")  # a plain state dict works too
    lbc.sparsify(Net(), method="asp", exclude=[], init_from=str(tmp_path / "plain.pt"))
    with pytest.raises(ConfigError, match="sparsity.init_from"):
        lbc.sparsify(Net(), method="asp", init_from=str(tmp_path / "missing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="sparsity.init_from.*not a readable checkpoint") as err:
        lbc.sparsify(Net(), method="asp", init_from=str(tmp_path / "broken.pt"))
    assert "\n" not in str(err.value)


def _apex_net(hidden=16):
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16, hidden), nn.Linear(hidden, 16),
                         nn.Linear(16, 10))


def test_apex_defaults_as_options():
    sp = lbc.sparsify(_apex_net(), method="asp", dense_epochs=0)
    assert set(sp.layers) == {"2", "3"}  # stem (3 inputs) and classifier dense by default
    sp = lbc.sparsify(_apex_net(), method="asp", dense_epochs=0, prune_classifier=True)
    assert set(sp.layers) == {"2", "3", "4"}
    sp = lbc.sparsify(_apex_net(hidden=12), method="asp", dense_epochs=0, apex_dims=True)
    assert set(sp.layers) == set()  # "2": out 12 not a multiple of 8; "3": in 12 not a multiple of 16
    assert "apex_dims" in sp.dense_reasons["2"] and "apex_dims" in sp.dense_reasons["3"]
    sp = lbc.sparsify(_apex_net(hidden=32), method="asp", dense_epochs=0, apex_dims=True, prune_classifier=True)
    assert set(sp.layers) == {"2", "3"}  # the classifier's 10 outputs are not a multiple of 8
    assert sp.is_exact_nm() and "4" in sp.dense_reasons


def test_resume_after_the_prune_keeps_the_mask(tmp_path):
    import copy

    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    sp.update(1)
    saved = copy.deepcopy((model.state_dict(), sp.state_dict()))
    torch.manual_seed(1)
    clone = Net()
    sp2 = lbc.sparsify(clone, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    clone.load_state_dict(saved[0])
    sp2.load_state_dict(saved[1])
    assert sp2.pruned and sp2.is_exact_nm()
    assert all(torch.equal(sp.masks()[k], v) for k, v in sp2.masks().items())
    sp2.update(1.5)  # no second prune
    assert all(torch.equal(sp.masks()[k], v) for k, v in sp2.masks().items())

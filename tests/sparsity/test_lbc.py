"""LBC against the paper: Eq. 8 masks, Eq. 9 gradients, Alg. 1 removal, exact N:M, resume."""

import copy
import itertools

import pytest
import torch
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.lbc import lbc_mask, mask_from_alive
from lbc.sparsity.nm import NMPattern, candidate_matrix, is_nm, to_groups

A24 = candidate_matrix(NMPattern(2, 4))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


@pytest.mark.parametrize(
    "alive,expected",
    [
        ([1, 0, 0, 0, 0, 0], [1, 1, 0, 0]),
        ([0, 0, 1, 0, 0, 0], [1, 0, 0, 1]),
        ([0, 0, 0, 1, 0, 1], [0, 1, 1, 1]),
        ([0, 1, 0, 0, 1, 0], [1, 1, 1, 1]),
        ([1, 1, 1, 1, 1, 1], [1, 1, 1, 1]),
    ],
)
def test_eq8_mask_from_hand_made_alive_sets(alive, expected):
    mask = mask_from_alive(torch.tensor([alive], dtype=torch.bool), NMPattern(2, 4), torch.Size([1, 4]))
    assert mask.tolist() == [[bool(v) for v in expected]]


def _reference_score_grad(weight, grad_out, alive, pattern):
    """Eq. 9 without autograd: dL/dS[g, j] = sum_{i in candidate j} W[g, i] * dL/dW_eff[g, i]."""
    gw = to_groups(weight * grad_out, pattern.m)
    out = torch.zeros(gw.shape[0], pattern.num_candidates, dtype=torch.float64)
    for j, members in enumerate(itertools.combinations(range(pattern.m), pattern.n)):
        for i in members:
            out[:, j] += gw[:, i].double()
    return out * alive


@pytest.mark.parametrize("shape", [(6, 8), (4, 8, 3, 3)])
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(2, 8)])
def test_eq9_score_gradient_and_masked_weight_gradient(shape, pattern):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen, requires_grad=True)
    groups = weight.numel() // pattern.m
    scores = torch.randn(groups, pattern.num_candidates, generator=gen, requires_grad=True)
    alive = torch.rand(groups, pattern.num_candidates, generator=gen) > 0.4
    alive[:, 0] = True
    a = candidate_matrix(pattern)
    mask = mask_from_alive(alive, pattern, weight.shape)
    grad_out = torch.randn(shape, generator=gen)
    out = lbc_mask(weight, scores, mask, alive, a)
    assert torch.equal(out, weight.detach() * mask)  # Eq. 7
    out.backward(grad_out)
    expected = _reference_score_grad(weight.detach(), grad_out, alive, pattern)
    torch.testing.assert_close(scores.grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(scores.grad[~alive], torch.zeros_like(scores.grad[~alive]))  # removed: no gradient
    assert torch.equal(weight.grad, grad_out * mask)  # dL/dW = B * dL/d(BW): masked, never dense
    assert (weight.grad[~mask] == 0).all()


def test_learned_scores_keep_the_candidate_minimising_a_linear_loss():
    """Frozen W, loss sum(c * W_eff): dL/dS_j = sum_{i in j} c_i W_i, so the best subset survives."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 6, bias=False)
    pattern = NMPattern(2, 4)
    sp = lbc.sparsify(layer, method="lbc", pattern=pattern, exclude=[], t_i=0, t_f=4, update_every="step")
    layer.parametrizations.weight.original.requires_grad_(False)
    c = torch.randn(6, 16)
    opt = torch.optim.SGD(sp.score_parameters(), lr=0.1)
    steps = 10
    for step in range(5 * steps):
        sp.update(step / steps)
        if not sp.score_parameters()[0].requires_grad:
            break  # one candidate left in every group: scores frozen
        opt.zero_grad()
        (c * layer.weight).sum().backward()
        opt.step()
    value = to_groups(c * layer.parametrizations.weight.original, 4) @ candidate_matrix(pattern).T
    best = value.argmin(dim=1)
    alive = layer.parametrizations.weight[0].alive
    assert (alive.sum(1) == 1).all()
    assert torch.equal(alive.float().argmax(1), best)


class Net(nn.Module):
    def __init__(self, m: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * m, 2 * m, 3, padding=1)
        self.fc = nn.Linear(2 * m, 2 * m)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _train(model, sp, epochs, steps, seed=0, opt=None, start=0):
    gen = torch.Generator().manual_seed(seed)
    groups = [{"params": [p for p in model.parameters() if all(p is not s for s in sp.score_parameters())]}]
    opt = opt or torch.optim.SGD(groups + sp.param_groups(1e-4), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(start, epochs * steps):
        sp.update(step / steps)
        x = torch.randn(4, model.conv.in_channels, 5, 5, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    sp.update(epochs)
    return opt


@pytest.mark.parametrize("pattern", ["1:4", "2:4", "2:8", "1:16", "4:8"])
def test_exactly_nm_after_t_f_on_conv_and_linear(pattern):
    torch.manual_seed(0)
    p = lbc.parse_pattern(pattern)
    model = Net(p.m)
    sp = lbc.sparsify(model, method="lbc", pattern=pattern, exclude=[], t_i=0, t_f=3)
    assert set(sp.layers) == {"conv", "fc"}
    _train(model, sp, epochs=4, steps=3)
    for layer in (model.conv, model.fc):
        kept = to_groups(layer.parametrizations.weight[0].mask, p.m).sum(1)
        assert (kept == p.n).all()  # exactly N kept in every group
        assert is_nm(layer.weight, p)
    assert sp.is_exact_nm()
    sp.finalize()
    assert sp.report()["scalars"]["exact_nm"] == 1.0
    assert sp.report()["scalars"]["alive_per_group"] == 1.0
    assert abs(sp.report()["scalars"]["density"] - p.density) < 1e-6
    assert all(not s.requires_grad for s in sp.score_parameters())  # no score work after t_f


def test_mask_changes_only_when_candidates_are_removed():
    model = Net(4)
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=4)
    mask = model.conv.parametrizations.weight[0].mask
    ptr = mask.data_ptr()
    before = mask.clone()
    sp.update(0.5)
    assert torch.equal(mask, before)  # epoch mode: nothing removed inside epoch 0
    sp.update(1.0)
    assert mask.data_ptr() == ptr and not torch.equal(mask, before)  # rebuilt in place, once
    removed = sp.removed
    sp.update(1.7)
    assert sp.removed == removed


def test_removal_is_final_and_lowest_first():
    layer = nn.Linear(4, 1, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=10)
    state = layer.parametrizations.weight[0]
    with torch.no_grad():
        state.scores.copy_(torch.tensor([[5.0, 0.0, 3.0, 1.0, 4.0, 2.0]]))
    sp.update(1)  # 2 removed: the scores 0 and 1 -> candidates 1 and 3
    assert state.alive.tolist() == [[True, False, True, False, True, True]]
    with torch.no_grad():
        state.scores.copy_(torch.tensor([[5.0, 100.0, 3.0, 100.0, 4.0, 2.0]]))
    sp.update(2)  # 3 removed in all: removed candidates stay removed whatever their score
    assert state.alive.tolist() == [[True, False, True, False, True, False]]


def test_ties_go_to_the_lower_index():
    layer = nn.Linear(4, 2, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=10)
    sp.update(1)
    assert layer.parametrizations.weight[0].alive.tolist() == [[False, False, True, True, True, True]] * 2


def test_state_dict_keeps_dense_key_and_mid_schedule_resume_is_bit_for_bit():
    torch.manual_seed(0)
    model = Net(4)
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=8, update_every="step")
    assert "conv.weight" in model.state_dict() and "fc.weight" in model.state_dict()
    opt = _train(model, sp, epochs=2, steps=3)
    assert 0 < sp.removed < 5  # in the middle of the schedule
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))

    clone = Net(4)
    sp2 = lbc.sparsify(clone, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=8, update_every="step")
    groups = [{"params": [p for p in clone.parameters() if all(p is not s for s in sp2.score_parameters())]}]
    opt2 = torch.optim.SGD(groups + sp2.param_groups(1e-4), lr=0.05, momentum=0.9, weight_decay=1e-4)
    clone.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sp2.load_state_dict(saved[2])

    _train(model, sp, epochs=9, steps=3, seed=1, opt=opt, start=6)
    _train(clone, sp2, epochs=9, steps=3, seed=1, opt=opt2, start=6)
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert sp.state_dict() == sp2.state_dict()
    assert sp.is_exact_nm()


def test_options_are_validated():
    with pytest.raises(ConfigError, match="sparsity.t_f"):
        lbc.sparsify(Net(4), method="lbc", pattern="2:4")
    with pytest.raises(ConfigError, match="sparsity.rounding"):
        lbc.sparsify(Net(4), method="lbc", pattern="2:4", t_f=2, rounding="up")
    with pytest.raises(ConfigError, match="sparsity.bogus"):
        lbc.sparsify(Net(4), method="lbc", pattern="2:4", t_f=2, bogus=1)
    with pytest.raises(ConfigError, match="sparsity.method"):
        lbc.sparsify(Net(4), method="nope")


def test_score_init_options():
    sp = lbc.sparsify(nn.Linear(8, 2), method="lbc", pattern="2:4", exclude=[], t_f=2, score_init="released")
    assert torch.allclose(sp.score_parameters()[0], torch.full((4, 6), 1 / 3))  # 1 / C(3, 1)
    sp = lbc.sparsify(nn.Linear(8, 2), method="lbc", pattern="2:4", exclude=[], t_f=2)
    assert torch.equal(sp.score_parameters()[0], torch.ones(4, 6))


def test_score_weight_decay_group():
    sp = lbc.sparsify(nn.Linear(8, 2), method="lbc", pattern="2:4", exclude=[], t_f=2)
    assert sp.param_groups(5e-4)[0]["weight_decay"] == 5e-4
    sp = lbc.sparsify(nn.Linear(8, 2), method="lbc", pattern="2:4", exclude=[], t_f=2, score_weight_decay=0.0)
    assert sp.param_groups(5e-4)[0]["weight_decay"] == 0.0


def test_memory_refusal_is_one_line(monkeypatch):
    import lbc.sparsity.lbc as lbc_module

    monkeypatch.setattr(lbc_module, "_free_memory", lambda device: 1024)
    with pytest.raises(ConfigError, match=r"sparsity.pattern=4:8.*scores per weight") as err:
        lbc.sparsify(Net(8), method="lbc", pattern="4:8", t_f=2)
    assert "\n" not in str(err.value)


def test_training_flops_follow_the_logged_density():
    model = Net(4)
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=2, input_size=(8, 5, 5))
    sp.update(0)
    assert sp.train_flops_ratio(1.0) == pytest.approx(1.0)
    sp.update(1)
    d1 = sp.step_cost()
    sp.update(2)
    d2 = sp.step_cost()
    assert d2 == pytest.approx(0.5)  # exactly 2:4 everywhere: half the work forward and backward
    sp.update(4)
    assert sp.train_flops_ratio() == pytest.approx((1.0 + d1 + 2 * d2) / 4)


@pytest.mark.parametrize("candidates", [4, 6, 8])
def test_removal_position_is_a_stable_ascending_sort(candidates):
    from lbc.sparsity.lbc import removal_position

    gen = torch.Generator().manual_seed(candidates)
    values = torch.randint(0, 3, (500, candidates), generator=gen).float()  # many ties
    values[values == 2] = float("inf")  # removed candidates rank last
    expected = torch.sort(values, dim=1, stable=True).indices.argsort(dim=1)
    assert torch.equal(removal_position(values).long(), expected)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "1:8", "1:16", "2:8", "4:8"])
def test_removal_and_masks_match_the_sort_and_the_incidence_matrix(pattern):
    """Every pattern (fast paths and general paths alike) removes the lowest-scored, ties by index."""
    p = lbc.parse_pattern(pattern)
    layer = nn.Linear(2 * p.m, 64, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern=p, exclude=[], t_i=0, t_f=10)
    state = layer.parametrizations.weight[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        state.scores.copy_(torch.randint(0, 4, state.scores.shape, generator=gen).float())
    scores = state.scores.detach().clone()
    sp.update(1)
    order = torch.sort(scores, dim=1, stable=True).indices
    expected = torch.ones_like(state.alive).scatter_(1, order[:, : sp.removed], False)
    assert sp.removed > 0 and torch.equal(state.alive, expected)
    reference = (expected.float() @ candidate_matrix(p)) > 0
    assert torch.equal(to_groups(state.mask, p.m), reference)


def test_scores_of_a_frozen_layer_stay_frozen_through_removals():
    """mmdet's frozen_stages turns requires_grad off for a stage's weights and scores: a removal must not turn it on."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=4, exclude=[])
    for p in model[1].parameters():  # what mmdet's _freeze_stages does: every parameter of the stage
        p.requires_grad_(False)
    sp.update(1)  # a removal
    assert sp.removed > 0
    assert not model[1].parametrizations.weight[0].scores.requires_grad
    assert model[0].parametrizations.weight[0].scores.requires_grad and model[2].parametrizations.weight[0].scores.requires_grad
    sp.update(4)  # final: the method freezes the rest ...
    assert not any(s.requires_grad for s in sp.score_parameters())
    state = sp.state_dict()
    state["removed"] = 1  # ... and unfreezes only those when an earlier state is loaded
    sp.load_state_dict(state)
    assert [s.requires_grad for s in sp.score_parameters()] == [True, False, True]

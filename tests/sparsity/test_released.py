"""Issue 8's method fidelity: ``removal="released"``, ``t_i == t_f``, float ``rounding="released"``
and SR-STE on LBC's gradual schedule (Eq. 6)."""

import math

import pytest
import torch
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.nm import NMPattern, candidate_matrix, is_exactly_nm, to_groups, topn_mask
from lbc.sparsity.schedule import removed_total

PATTERN = NMPattern(2, 4)  # candidates in combinations order: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def _state(sp):
    return next(iter(sp.layers.values())).parametrizations.weight[0]


# --- rounding="released": the authors' float arithmetic --------------------------------------------
def test_released_rounding_is_float_arithmetic_for_2x8():
    # 27 * (1 - 20/60)**3 == 8.000000000000002 in floats: ceil gives 9, so one fewer is removed
    assert 27 * (1 - 20 / 60) ** 3 > 8
    assert removed_total(20, 0, 60, 28, rounding="released") == 27 - 9
    assert removed_total(20, 0, 60, 28, rounding="paper") == 19  # exact: ceil(27 * (1 - 8/27)) = 19
    assert 27 * (1 - 40 / 60) ** 3 > 1  # 1.0000000000000002
    assert removed_total(40, 0, 60, 28, rounding="released") == 27 - 2
    assert removed_total(40, 0, 60, 28, rounding="paper") == 26


# --- removal="released": a hand-worked example ------------------------------------------------------
def _one_group(removal):
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.4, -0.3, 0.2, 0.1]]))
    return lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=4, removal=removal)


def test_released_removal_hand_worked_revival():
    """k = 3 at epoch 1 and 5 at epoch 4 (Eq. 6, C = 6, t_f = 4). Released: the 3 lowest scores are
    zeroed; a zeroed score that momentum moved back above the others comes back at the next step.
    Paper: removal is final, so the same scores keep a different candidate."""
    scores = torch.tensor([[0.2, 0.05, 0.1, -0.1, 0.3, 0.15]])
    moved = torch.tensor([[0.2, 0.0, 0.25, 0.0, 0.12, 0.15]])  # what an optimizer step might leave
    released, paper = _one_group("released"), _one_group("paper")
    for sp in (released, paper):
        _state(sp).scores.data.copy_(scores)
        sp.update(1.0)
        assert sp.removed == 3
        # alive: (0,1) (1,3) (2,3), which together cover every weight
        assert _state(sp).alive.tolist() == [[True, False, False, False, True, True]]
        assert _state(sp).mask.tolist() == [[True, True, True, True]]
    assert torch.equal(_state(released).scores, scores * torch.tensor([[1.0, 0, 0, 0, 1, 1]]))
    assert torch.equal(_state(paper).scores, scores)  # paper mode leaves the scores alone
    for sp in (released, paper):
        _state(sp).scores.data.copy_(moved)
        sp.update(4.0)
        assert sp.removed == 5
    # released: exact zeros rank lowest, candidate 2 = (0,3) came back and is the survivor
    assert _state(released).alive.tolist() == [[False, False, True, False, False, False]]
    assert _state(released).mask.tolist() == [[True, False, False, True]]
    assert torch.equal(_state(released).scores, moved * torch.tensor([[0.0, 0, 1, 0, 0, 0]]))
    # paper: candidate 2 was removed for good; the best alive is candidate 0 = (0,1)
    assert _state(paper).alive.tolist() == [[True, False, False, False, False, False]]
    assert _state(paper).mask.tolist() == [[True, True, False, False]]
    for sp in (released, paper):  # both freeze the scores once one candidate is left
        assert not _state(sp).scores.requires_grad


# --- removal="released": lock step against the authors' algorithm ------------------------------------
class _ReleasedReference(nn.Module):
    """The released code's NM layer and per-iteration selection, restated for a Linear layer."""

    def __init__(self, weight, bias, scores, pattern):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())
        self.alpha = nn.Parameter(scores.clone())
        self.register_buffer("incidence", candidate_matrix(pattern))
        self.k = 0

    def select(self):  # before every iteration: zero scores go first, the k lowest are zeroed
        with torch.no_grad():
            self.alpha -= (self.alpha == 0) * 1000
            lowest = torch.topk(self.alpha, k=self.k, dim=1, largest=False).indices
            self.alpha.scatter_(1, lowest, 0)

    def alive(self):
        return self.alpha != 0

    def forward(self, x):
        alpha = self.alpha * (self.alpha != 0).to(self.alpha.dtype)
        summed = alpha @ self.incidence
        # forward: 1 where some alive candidate holds the weight; backward: straight through
        mask = summed + ((summed != 0).to(summed.dtype) - summed).detach()
        return nn.functional.linear(x, mask.reshape(self.weight.shape) * self.weight, self.bias)


def _released_k(epoch, t_i, t_f, candidates):
    card = 1 + math.ceil((candidates - 1) * (1 - (epoch - t_i) / (t_f - t_i)) ** 3)
    return candidates - card


def test_released_removal_matches_the_authors_algorithm_in_lock_step():
    torch.manual_seed(0)
    features, outputs, epochs, steps, t_f = 32, 8, 5, 6, 4
    x, y = torch.randn(64, features), torch.randn(64, outputs)
    layer = nn.Linear(features, outputs)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=t_f, removal="released",
                      rounding="released", score_init="released")
    state = _state(sp)
    state.scores.data.add_(torch.randn_like(state.scores) * 0.05)  # distinct scores: no ties to break
    ref = _ReleasedReference(layer.parametrizations.weight.original.detach(),
                             layer.bias.detach(), state.scores.detach(), PATTERN)

    def optimizer(weight, bias, scores):
        return torch.optim.SGD([{"params": [weight, bias]}, {"params": [scores]}],
                               lr=0.5, momentum=0.9, weight_decay=5e-4)

    ours = optimizer(layer.parametrizations.weight.original, layer.bias, state.scores)
    theirs = optimizer(ref.weight, ref.bias, ref.alpha)
    revived = 0
    previous = None
    for epoch in range(epochs):
        if ref.k < PATTERN.num_candidates - 1:
            ref.k = _released_k(epoch, 0, t_f, PATTERN.num_candidates)
            if ref.k == PATTERN.num_candidates - 1:
                theirs.param_groups[1]["weight_decay"] = theirs.param_groups[1]["momentum"] = 0
                ref.alpha.requires_grad_(False)
        for i in range(steps):
            sp.update(epoch + i / steps)
            ref.select()
            assert sp.removed == ref.k
            assert torch.equal(state.alive, ref.alive()), f"epoch {epoch} step {i}"
            torch.testing.assert_close(state.scores.detach(), ref.alpha.detach(), rtol=0, atol=1e-6)
            if previous is not None:
                revived += int((state.alive & ~previous).sum())
            previous = state.alive.clone()
            for model, opt in ((layer, ours), (ref, theirs)):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
    assert revived > 0, "the example must exercise revival through momentum"
    assert is_exactly_nm(state.mask, PATTERN)


# --- t_i == t_f -------------------------------------------------------------------------------------
def test_paper_removal_refuses_t_f_zero_for_learned_criteria():
    for criterion in ("score", "score_inverse", "gradient"):
        with pytest.raises(ConfigError, match="removal=released") as err:
            lbc.sparsify(nn.Linear(8, 4), method="lbc", t_i=0, t_f=0, criterion=criterion)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="criterion=magnitude needs removal=paper"):
        lbc.sparsify(nn.Linear(8, 4), method="lbc", t_i=0, t_f=0, removal="released", criterion="magnitude")


def test_paper_removal_t_f_zero_magnitude_is_one_shot_magnitude():
    torch.manual_seed(1)
    layer = nn.Linear(16, 4)
    sp = lbc.sparsify(layer, method="lbc", exclude=[], t_i=0, t_f=0, criterion="magnitude")
    sp.update(0.0)
    weight = layer.parametrizations.weight.original
    assert torch.equal(_state(sp).mask, topn_mask(weight, PATTERN))  # best pair = the two largest |w|


def test_paper_removal_t_i_equal_t_f_is_one_shot_by_learned_scores():
    torch.manual_seed(2)
    layer = nn.Linear(16, 4)
    sp = lbc.sparsify(layer, method="lbc", exclude=[], t_i=2, t_f=2)
    state = _state(sp)
    for epoch in (0.0, 1.0, 1.9):
        sp.update(epoch)
        assert sp.removed == 0 and state.alive.all()
    learned = torch.randn_like(state.scores)
    state.scores.data.copy_(learned)
    sp.update(2.0)
    assert sp.removed == PATTERN.num_candidates - 1
    assert torch.equal(state.alive.float().argmax(1), learned.argmax(1))


def test_released_removal_t_f_zero_keeps_learning_which_candidate_survives():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sp = lbc.sparsify(model, method="lbc", exclude=[], t_i=0, t_f=0, removal="released")
    optimizer = torch.optim.SGD(lbc.param_groups(model, sp, 5e-4), lr=0.2, momentum=0.9)
    x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
    states = [m.parametrizations.weight[0] for m in sp.layers.values()]
    for step in range(40):
        sp.update(step / 10)
        for state in states:
            assert state.alive.sum(1).eq(1).all()  # 2:4 from the first step: one candidate per group
            survivor = state.alive.float().argmax(1, keepdim=True)
            assert torch.equal(state.scores.detach().gather(1, survivor), state.scores.detach().amax(1, True))
            assert state.scores.requires_grad  # never frozen: the scores keep choosing
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(state.scores.grad.ne(0).sum(1).gt(1).any() for state in states)  # not only the alive one
        optimizer.step()
    sp.update(4.0)
    kept = torch.cat([state.alive.float().argmax(1) for state in states])
    # at step 0 every score is equal and ties remove the lower index first: candidate 5 is kept then
    assert (kept != 5).float().mean() > 0.3, "the survivor must not stay the tie-break's choice (index order)"
    assert kept.unique().numel() == PATTERN.num_candidates
    assert sp.is_exact_nm()
    sp.finalize()


# --- SR-STE on the gradual schedule --------------------------------------------------------------------
def test_srste_gradual_keeps_m_down_to_n_on_eq6():
    torch.manual_seed(4)
    layer = nn.Linear(16, 8, bias=False)
    sp = lbc.sparsify(layer, method="srste", pattern="1:4", exclude=[], t_i=0, t_f=8)
    # kept = 4 - ceil(3 * (1 - (1 - t/8)^3)), by hand: t=1: ceil(0.990) = 1; t=2: ceil(1.734) = 2;
    # t=3: ceil(2.262) = 3, from then on 3 removed: kept 1
    expected = {0: 4, 1: 3, 2: 2, 3: 1, 5: 1, 8: 1, 9: 1}
    costs = []
    for epoch in range(10):
        sp.update(float(epoch))
        if epoch in expected:
            assert sp.kept == expected[epoch], epoch
        density = float(_state(sp).mask.float().mean())
        assert density == sp.kept / 4
        assert torch.equal(_state(sp).mask, _state(sp).top_mask(layer.parametrizations.weight.original))
        costs.append((density + 2) / 3)  # sparse forward, dense backward
    assert sp.train_flops_ratio(10.0) == pytest.approx(sum(costs) / 10)
    layer(torch.randn(2, 16)).sum().backward()  # the forward uses the kept count
    assert is_exactly_nm(_state(sp).mask, NMPattern(1, 4))


def test_srste_without_schedule_is_unchanged_and_t_equal_zero_is_plain_srste():
    torch.manual_seed(5)
    plain, scheduled = nn.Linear(16, 8), nn.Linear(16, 8)
    scheduled.load_state_dict(plain.state_dict())
    a = lbc.sparsify(plain, method="srste", pattern="1:4", exclude=[])
    b = lbc.sparsify(scheduled, method="srste", pattern="1:4", exclude=[], t_i=0, t_f=0)
    x = torch.randn(4, 16)
    for sp in (a, b):
        sp.update(0.0)
    assert torch.equal(plain(x), scheduled(x))
    assert a.train_flops_ratio(1.0) == pytest.approx(b.train_flops_ratio(1.0))
    with pytest.raises(ConfigError, match="sparsity.t_f"):
        lbc.sparsify(nn.Linear(16, 8), method="srste", t_i=0)


def test_released_removal_resumes_exactly():
    torch.manual_seed(6)

    def run(stop_at=None, resume=None):
        torch.manual_seed(7)
        model = nn.Linear(16, 4)
        sp = lbc.sparsify(model, method="lbc", exclude=[], t_i=0, t_f=3, removal="released")
        opt = torch.optim.SGD(lbc.param_groups(model, sp, 0.0), lr=0.3, momentum=0.9)
        start = 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["opt"])
            sp.load_state_dict(resume["sp"])
            start = resume["step"]
        x, y = torch.randn(32, 16), torch.randn(32, 4)
        for step in range(start, 24):
            if step == stop_at:
                return {"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict(), "step": step}
            sp.update(step / 6)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, sp

    straight_model, straight = run()
    resumed_model, resumed = run(resume=run(stop_at=13))
    assert torch.equal(_state(straight).alive, _state(resumed).alive)
    assert torch.equal(straight_model.state_dict()["weight"], resumed_model.state_dict()["weight"])
    assert straight.removed == resumed.removed == PATTERN.num_candidates - 1
    assert to_groups(_state(straight).mask, 4).sum(1).eq(2).all()


# --- freeze_scores: the scores after t_f (ResNet script: frozen; DeiT script: they keep training) --------
def _deit_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_unfrozen_released_scores_match_the_authors_deit_algorithm_and_survivors_change():
    """freeze_scores=False with removal=released is the DeiT script: after t_f the selection (k = C - 1) runs
    before every step and AdamW keeps updating and decaying every score, so a group's survivor can change."""
    torch.manual_seed(0)
    features, outputs, epochs, steps, t_f = 32, 8, 10, 6, 4
    x, y = torch.randn(64, features), torch.randn(64, outputs)
    layer = nn.Linear(features, outputs)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=t_f, removal="released",
                      rounding="released", score_init="released", freeze_scores=False)
    state = _state(sp)
    state.scores.data.add_(torch.randn_like(state.scores) * 0.05)
    ref = _ReleasedReference(layer.parametrizations.weight.original.detach(),
                             layer.bias.detach(), state.scores.detach(), PATTERN)

    def optimizer(weight, bias, scores):
        return torch.optim.AdamW([{"params": [weight, bias]}, {"params": [scores]}], lr=0.05, weight_decay=0.05)

    ours = optimizer(layer.parametrizations.weight.original, layer.bias, state.scores)
    theirs = optimizer(ref.weight, ref.bias, ref.alpha)
    changed_after_t_f, previous = 0, None
    for epoch in range(epochs):
        ref.k = PATTERN.num_candidates - 1 if epoch >= t_f else _released_k(epoch, 0, t_f, PATTERN.num_candidates)
        for i in range(steps):
            sp.update(epoch + i / steps)
            ref.select()
            assert torch.equal(state.alive, ref.alive()), f"epoch {epoch} step {i}"
            torch.testing.assert_close(state.scores.detach(), ref.alpha.detach(), rtol=0, atol=1e-5)
            assert state.scores.requires_grad  # never frozen
            if epoch >= t_f:
                assert is_exactly_nm(state.mask, PATTERN)
                changed_after_t_f += int((state.alive != previous).any(dim=1).sum())
            previous = state.alive.clone()
            for model, opt in ((layer, ours), (ref, theirs)):
                _deit_step(model, opt, x, y)
    assert changed_after_t_f > 0, "the example must show a survivor changing after t_f"
    sp.finalize()


def _train_after_t_f(freeze_scores: bool, removal: str):
    torch.manual_seed(3)
    layer = nn.Linear(16, 8)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=2, removal=removal,
                      freeze_scores=freeze_scores)
    state = _state(sp)
    opt = torch.optim.AdamW([{"params": [layer.parametrizations.weight.original, layer.bias]}]
                            + sp.param_groups(0.05), lr=0.05, weight_decay=0.05)
    gen = torch.Generator().manual_seed(4)
    record = []
    for step in range(6 * 4):
        sp.update(step / 4)
        x = torch.randn(8, 16, generator=gen)
        _deit_step(layer, opt, x, torch.randn(8, 8, generator=gen))
        final = sp.removed == PATTERN.num_candidates - 1  # one candidate left (here from epoch 1 on)
        record.append((final, state.mask.clone(), state.scores.detach().clone(),
                       layer.parametrizations.weight.original.detach().clone(), state.scores.requires_grad))
    assert sum(r[0] for r in record) >= 12, "the example must train on after the last removal"
    return sp, record


@pytest.mark.parametrize("removal", ["paper", "released"])
def test_frozen_scores_stop_at_t_f_and_the_mask_with_them(removal):
    sp, record = _train_after_t_f(True, removal)
    after = [r for r in record if r[0]]
    assert not any(r[4] for r in after)  # frozen once one candidate is left
    assert all(r[4] for r in record if not r[0])
    for _, mask, scores, _, _ in after:
        assert torch.equal(mask, after[0][1]) and torch.equal(scores, after[0][2])  # neither moves again
    sp.finalize()


def test_unfrozen_scores_with_paper_removal_train_on_and_the_model_is_the_same():
    """Paper removal is final: scores that keep training after t_f (AdamW updates and decays them) change
    nothing but themselves; masks and weights are those of the frozen run, bit for bit."""
    _, frozen = _train_after_t_f(True, "paper")
    sp, unfrozen = _train_after_t_f(False, "paper")
    for f, u in zip(frozen, unfrozen, strict=True):
        assert torch.equal(f[1], u[1]) and torch.equal(f[3], u[3])  # masks and weights
    after = [r for r in unfrozen if r[0]]
    assert all(r[4] for r in after)  # still training
    assert not torch.equal(after[0][2], after[-1][2])  # and the scores moved
    assert all(torch.equal(r[1], after[0][1]) for r in after)  # the mask did not
    sp.finalize()


def test_unfrozen_released_survivor_follows_the_scores_after_t_f():
    """removal=released, freeze_scores=False: after t_f the alive candidate is re-chosen by score before every
    step (top-1, the others zeroed); with frozen scores the final choice stands."""
    for freeze in (True, False):
        sp = lbc.sparsify(nn.Linear(4, 1, bias=False), method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=4,
                          removal="released", freeze_scores=freeze)
        state = _state(sp)
        state.scores.data.copy_(torch.tensor([[0.2, 0.05, 0.1, -0.1, 0.3, 0.15]]))
        sp.update(4.0)
        assert state.alive.tolist() == [[False, False, False, False, True, False]]  # (1,3), the best
        assert state.scores.requires_grad is not freeze
        state.scores.data.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.1, 0.0]]))
        state.scores.data[0, 2] = 0.4  # momentum moved a zeroed score above the survivor
        sp.update(4.5)
        expected = [False, False, True, False, False, False] if not freeze else [False, False, False, False, True, False]
        assert state.alive.tolist() == [expected]
        assert is_exactly_nm(state.mask, PATTERN)


def test_the_deit_presets_released_recipe_composes_with_unfrozen_scores():
    """What the DeiT row's header says runs the released DeiT script's LBC: it composes and attaches."""
    from lbc.config import validate
    from tests.helpers import compose_config

    overrides = ["sparsity.exponent=4", "sparsity.t_f=200", "sparsity.freeze_scores=false", "sparsity.removal=released"]
    typed = validate(compose_config(["experiment=table1/deit_small_lbc_2x4", "data.root=/data", "run_dir=/tmp/x",
                                     *overrides]))
    options = typed["sparsity"]
    assert (options.exponent, options.t_f, options.freeze_scores, options.removal) == (4, 200, False, "released")
    assert validate(compose_config(["experiment=table1/deit_small_lbc_2x4", "data.root=/data",
                                    "run_dir=/tmp/x"]))["sparsity"].freeze_scores is True  # the default: unchanged
    sp = lbc.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), **{**vars(options), "exclude": []})
    sp.update(250)
    assert sp.freeze_when_final is False and all(s.requires_grad for s in sp.score_parameters())
    with pytest.raises(ConfigError, match="sparsity.freeze_scores"):
        lbc.sparsify(nn.Linear(8, 4), method="lbc", t_f=2, freeze_scores="no")

"""Starting from a one-shot mask (``sparsity.prior``): LBC's boosted candidate, ASP's immediate prune, the checks."""

import copy

import pytest
import torch
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.lbc import LBCOptions, candidate_index
from lbc.sparsity.nm import candidate_matrix, from_groups, parse_pattern, to_groups, topn_mask
from lbc.sparsity.options import PRIORS


class Net(nn.Module):
    """A Conv2d and a Linear whose input dimensions fit M."""

    def __init__(self, m: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * m, 2 * m, 3, padding=1)
        self.fc = nn.Linear(2 * m, 4 * m)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _prior_masks(sp, seed=0, avoid_last=True):
    """A random exactly-N:M mask per layer (one random candidate per group) and the candidate indices.

    ``avoid_last``: never the last candidate, the one index order leaves when every score is equal
    (ties remove the lower index first), so the prior differs from "nothing learned" in every group.
    """
    gen = torch.Generator().manual_seed(seed)
    pattern = sp.pattern
    a = candidate_matrix(pattern).bool()
    masks, picks = {}, {}
    for name, module in sp.layers.items():
        shape = module.parametrizations.weight.original.shape
        groups = module.parametrizations.weight.original.numel() // pattern.m
        high = pattern.num_candidates - 1 if avoid_last else pattern.num_candidates
        picks[name] = torch.randint(0, high, (groups,), generator=gen)
        masks[name] = from_groups(a[picks[name]], shape).contiguous()
    return masks, picks


def _index_order_survivor_mask(sp, name):
    """The mask when nothing is learned and no prior is given: the last candidate in every group."""
    a = candidate_matrix(sp.pattern).bool()
    weight = sp.layers[name].parametrizations.weight.original
    return from_groups(a[-1].expand(weight.numel() // sp.pattern.m, -1), weight.shape)


def _lbc(pattern="2:4", **options):
    p = parse_pattern(pattern)
    torch.manual_seed(0)
    model = Net(p.m)
    return model, lbc.sparsify(model, method="lbc", pattern=pattern, exclude=[], **{"t_i": 0, "t_f": 3, **options})


# --- LBC: the prior's candidate survives when nothing is learned -------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8"])
@pytest.mark.parametrize("removal", ["paper", "released"])
def test_lbc_with_a_prior_ends_with_exactly_the_prior_mask(pattern, removal):
    model, sp = _lbc(pattern, prior="wanda", removal=removal)
    masks, _ = _prior_masks(sp)
    sp.start_from(masks)
    for epoch in (0, 0.5, 1, 1.5, 2, 2.5, 3, 4):  # the whole t_i..t_f schedule, no gradient step
        sp.update(epoch)
    assert sp.removed == sp.pattern.num_candidates - 1
    for name in sp.layers:
        assert torch.equal(sp.layer_mask(name), masks[name]), name
    assert sp.is_exact_nm()
    sp.finalize()

    _, plain = _lbc(pattern, removal=removal)  # no prior: the survivor is index order, unlike the prior's
    for epoch in (0, 1, 2, 3, 4):
        plain.update(epoch)
    for name in plain.layers:
        survivor = plain.layer_mask(name)
        assert torch.equal(survivor, _index_order_survivor_mask(plain, name))
        assert not torch.equal(to_groups(survivor, plain.pattern.m), to_groups(masks[name], plain.pattern.m))
        assert (to_groups(survivor, plain.pattern.m) != to_groups(masks[name], plain.pattern.m)).any(1).all()


def test_lbc_prior_allows_t_f_zero_with_paper_removal_the_prior_is_the_one_shot_survivor():
    with pytest.raises(ConfigError, match="arbitrary index"):
        LBCOptions(t_i=0, t_f=0)
    model, sp = _lbc(prior="sparsegpt", t_f=0)
    masks, _ = _prior_masks(sp, seed=3)
    sp.start_from(masks)
    sp.update(0)
    assert all(torch.equal(sp.layer_mask(n), masks[n]) for n in sp.layers)


@pytest.mark.parametrize("score_init, margin", [("paper", 1.0), ("released", 0.25), (0.0, 3.0)])
def test_start_from_adds_the_margin_to_the_prior_candidate_only(score_init, margin):
    model, sp = _lbc(prior="magnitude", score_init=score_init, prior_margin=margin)
    masks, _ = _prior_masks(sp, seed=1, avoid_last=False)
    before = [s.detach().clone() for s in sp.score_parameters()]
    dense = {n: m.parametrizations.weight.original.detach().clone() for n, m in sp.layers.items()}
    sp.start_from(masks, weights={n: torch.zeros_like(w) for n, w in dense.items()})
    a = candidate_matrix(sp.pattern).bool()
    for (name, module), start, scores in zip(sp.layers.items(), before, sp.score_parameters(), strict=True):
        groups = to_groups(masks[name], sp.pattern.m)
        one_hot = (groups[:, None, :] == a[None]).all(-1)  # (G, C): the candidate each group keeps, by comparison
        assert (one_hot.sum(1) == 1).all()
        assert torch.equal(scores.detach(), start + margin * one_hot.float())
        # weights are ignored: LBC learns the mask of the weights as they are
        assert torch.equal(module.parametrizations.weight.original, dense[name])
        assert module.parametrizations.weight[0].alive.all()  # nothing removed yet


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8", "1:16"])
def test_candidate_index_maps_every_candidate_mask_to_its_index(pattern):
    p = parse_pattern(pattern)
    a = candidate_matrix(p).bool()
    assert torch.equal(candidate_index(a, p), torch.arange(p.num_candidates))
    order = torch.randperm(p.num_candidates, generator=torch.Generator().manual_seed(0)).repeat(3)
    assert torch.equal(candidate_index(a[order], p), order)
    with pytest.raises(ValueError, match="does not keep exactly"):
        candidate_index(torch.cat([a, torch.ones(1, p.m, dtype=torch.bool)]), p)  # a row keeping all M


# --- the checks of a given mask set ------------------------------------------------------------------
def _not_nm(masks):
    mask = masks["conv"].clone()
    mask.view(-1)[mask.view(-1).nonzero()[0]] = False  # one group keeps N - 1
    return {**masks, "conv": mask}


def _too_many(masks):
    return {**masks, "fc": torch.ones_like(masks["fc"])}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_not_nm, r"mask of layer 'conv' is not exactly 2:4"),
        (_too_many, r"mask of layer 'fc' is not exactly 2:4"),
        (lambda m: {**m, "fc": m["fc"][:, :4]}, r"mask of layer 'fc' has shape \(16, 4\), not its weight's \(16, 8\)"),
        (lambda m: {"fc": m["fc"]}, r"no one-shot mask for layer 'conv'"),
        (lambda m: {**m, "head": m["fc"]}, r"one-shot mask for 'head', which is not a layer of (lbc|asp)"),
        (lambda m: {**m, "conv": m["conv"].float()}, r"mask of layer 'conv' is torch.float32, not bool"),
        (lambda m: {**m, "conv": m["conv"].tolist()}, r"mask of layer 'conv' is a list, not a tensor"),
    ],
)
@pytest.mark.parametrize("method", ["lbc", "asp"])
def test_bad_masks_are_one_line_config_errors(method, mutate, message):
    torch.manual_seed(0)
    model = Net()
    options = {"t_f": 2, "prior": "wanda"} if method == "lbc" else {"dense_epochs": 0, "prior": "wanda"}
    sp = lbc.sparsify(model, method=method, exclude=[], **options)
    masks, _ = _prior_masks(sp)
    scores = [s.detach().clone() for s in sp.score_parameters()]
    with pytest.raises(ConfigError, match=f"^sparsity.prior=wanda: .*{message}") as err:
        sp.start_from(mutate(masks))
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(scores, sp.score_parameters(), strict=True))  # nothing changed
    assert all(sp.layer_mask(n).all() for n in sp.layers)


@pytest.mark.parametrize("method", ["lbc", "asp"])
def test_bad_weights_are_one_line_config_errors(method):
    model = Net()
    options = {"t_f": 2, "prior": "sparsegpt"} if method == "lbc" else {"dense_epochs": 0, "prior": "sparsegpt"}
    sp = lbc.sparsify(model, method=method, exclude=[], **options)
    masks, _ = _prior_masks(sp)
    weights = {n: torch.zeros(m.parametrizations.weight.original.shape) for n, m in sp.layers.items()}
    for bad, message in (({**weights, "fc": torch.zeros(3, 8)}, r"weight of layer 'fc' has shape \(3, 8\)"),
                         ({"fc": weights["fc"]}, r"no one-shot weight for layer 'conv'"),
                         ({**weights, "fc": weights["fc"].long()}, r"weight of layer 'fc' is torch.int64")):
        with pytest.raises(ConfigError, match=message) as err:
            sp.start_from(masks, bad)
        assert "\n" not in str(err.value)


# --- the options and the order of calls --------------------------------------------------------------
@pytest.mark.parametrize(
    "method, options, key",
    [
        ("lbc", {"t_f": 2, "prior": "obs"}, "sparsity.prior"),
        ("lbc", {"t_f": 2, "prior": "wanda", "criterion": "magnitude"}, "sparsity.prior"),
        ("lbc", {"t_f": 2, "prior": "wanda", "criterion": "gradient"}, "sparsity.prior"),
        ("lbc", {"t_f": 2, "prior_margin": 0}, "sparsity.prior_margin"),
        ("lbc", {"t_f": 2, "prior_margin": -1.0}, "sparsity.prior_margin"),
        ("lbc", {"t_f": 2, "prior_margin": "big"}, "sparsity.prior_margin"),
        ("asp", {"prior": "obs", "dense_epochs": 0}, "sparsity.prior"),
        ("asp", {"prior": "wanda", "dense_epochs": 2}, "sparsity.dense_epochs"),
        ("asp", {"prior": "magnitude", "dense_epochs": 1}, "sparsity.dense_epochs"),
    ],
)
def test_prior_options_are_checked(method, options, key):
    with pytest.raises(ConfigError, match=f"^{key}=") as err:
        lbc.sparsify(Net(), method=method, **options)
    assert "\n" not in str(err.value)


def test_priors_and_the_prior_property():
    assert PRIORS == ("magnitude", "wanda", "sparsegpt")
    for prior in (*PRIORS, None):
        assert lbc.sparsify(Net(), method="lbc", t_f=2, prior=prior, exclude=[]).prior == prior
        assert lbc.sparsify(Net(), method="asp", dense_epochs=0, prior=prior, exclude=[]).prior == prior
    for method in ("srste", "dense"):
        assert lbc.sparsify(Net(), method=method, exclude=[]).prior is None


@pytest.mark.parametrize("method", ["srste", "dense"])
def test_a_method_without_prior_support_refuses_in_one_line(method):
    model = Net()
    sp = lbc.sparsify(model, method=method, exclude=[])
    with pytest.raises(ConfigError, match=f"^sparsity.prior: {method} cannot start from a one-shot mask$"):
        sp.start_from({n: torch.ones(2, 2, dtype=torch.bool) for n in sp.layers})


def test_lbc_prior_needs_start_from_once_before_training_but_not_on_resume():
    model, sp = _lbc(prior="wanda")
    with pytest.raises(ConfigError, match=r"^sparsity.prior=wanda: lbc was never given the one-shot masks") as err:
        sp.update(0)
    assert "\n" not in str(err.value)
    masks, _ = _prior_masks(sp)
    sp.start_from(masks)
    with pytest.raises(RuntimeError, match="given already"):
        sp.start_from(masks)  # twice would add the margin twice
    sp.update(1)
    saved = copy.deepcopy((model.state_dict(), sp.state_dict()))

    resumed_model, resumed = _lbc(prior="wanda")  # a resumed run: the checkpoint holds the boosted scores
    resumed_model.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    for epoch in (1, 2, 3):
        resumed.update(epoch)
    assert all(torch.equal(resumed.layer_mask(n), masks[n]) for n in resumed.layers)

    _, plain = _lbc()
    with pytest.raises(ConfigError, match=r"^sparsity.prior=null: lbc starts from no one-shot mask"):
        plain.start_from(masks)


def test_score_inverse_removes_the_prior_candidate_first():
    _, sp = _lbc(prior="wanda", criterion="score_inverse")
    masks, picks = _prior_masks(sp)
    sp.start_from(masks)
    sp.update(1)  # the first removal: the highest-scored go first under score_inverse
    for name, state in zip(sp.layers, (m.parametrizations.weight[0] for m in sp.layers.values()), strict=True):
        assert not state.alive.gather(1, picks[name][:, None]).any()


# --- ASP: prune at once with the prior's masks (and SparseGPT's weights) -----------------------------
def _opposite_of_magnitude(weight, pattern):
    """The N smallest |w| of every group (2:4: disjoint from magnitude's mask), an exactly N:M mask."""
    return topn_mask(1.0 / (weight.detach().abs() + 1e-12), pattern)


@pytest.mark.parametrize("with_weights", [False, True])
def test_asp_start_from_sets_exactly_the_masks_and_the_weights(with_weights):
    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0, prior="sparsegpt")
    dense = {n: m.parametrizations.weight.original.detach().clone() for n, m in sp.layers.items()}
    masks = {n: _opposite_of_magnitude(w, sp.pattern) for n, w in dense.items()}
    gen = torch.Generator().manual_seed(5)
    weights = {n: torch.randn(w.shape, generator=gen) for n, w in dense.items()} if with_weights else None
    sp.start_from(masks, weights)
    assert sp.pruned and sp.is_exact_nm()
    for name, module in sp.layers.items():
        assert torch.equal(module.parametrizations.weight[0].mask, masks[name])
        assert not (masks[name] & topn_mask(dense[name], sp.pattern)).any()  # not what magnitude would keep
        source = weights[name] if with_weights else dense[name]
        expected = torch.where(masks[name], source, torch.zeros(()))  # pruned entries zero, kept ones as given
        assert torch.equal(module.parametrizations.weight.original, expected)
        assert torch.equal(module.weight, expected)
    assert sp.state_dict()["cost_timeline"] == [(0.0, 0.5)]  # sparse from the first step on
    for epoch in (0, 1, 2.5):  # update() prunes no more
        sp.update(epoch)
        assert all(torch.equal(sp.layers[n].parametrizations.weight[0].mask, masks[n]) for n in masks)
    sp.finalize()


def test_asp_prior_magnitude_without_start_from_is_plain_asp_bit_for_bit():
    torch.manual_seed(0)
    base = Net()
    twin = copy.deepcopy(base)
    plain = lbc.sparsify(base, method="asp", exclude=[], dense_epochs=0)
    prior = lbc.sparsify(twin, method="asp", exclude=[], dense_epochs=0, prior="magnitude")
    plain.update(0)
    prior.update(0)
    for (k, a), (k2, b) in zip(base.state_dict().items(), twin.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert prior.pruned and prior.is_exact_nm()
    assert plain.state_dict() == prior.state_dict()


def test_asp_calibrated_prior_without_start_from_is_a_one_line_error():
    sp = lbc.sparsify(Net(), method="asp", exclude=[], dense_epochs=0, prior="wanda")
    with pytest.raises(ConfigError, match=r"^sparsity.prior=wanda: asp was never given the one-shot masks") as err:
        sp.update(0)
    assert "\n" not in str(err.value) and not sp.pruned
    plain = lbc.sparsify(Net(), method="asp", exclude=[], dense_epochs=0)
    with pytest.raises(ConfigError, match=r"^sparsity.prior=null: asp starts from no one-shot mask"):
        plain.start_from({})

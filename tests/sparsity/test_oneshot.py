"""One-shot criteria (magnitude, Wanda, SparseGPT) against hand-made cases and a plain reference, and their methods."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lbc
import lbc.sparsity.oneshot  # noqa: F401  (registers the methods until lbc.sparsity imports it)
from lbc.errors import ConfigError
from lbc.sparsity.base import stored_weight
from lbc.sparsity.nm import NMPattern, is_exactly_nm, topn_mask
from lbc.sparsity.oneshot import magnitude_mask, sparsegpt_prune, wanda_mask

T, F_ = True, False
ONE_SHOT = ("magnitude", "wanda", "sparsegpt")


def test_magnitude_mask_is_topn():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(magnitude_mask(w, "2:4"), topn_mask(w, NMPattern(2, 4)))


def test_wanda_mask_by_hand():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0],
                           [-4.0, 1.0, -1.0, 2.0, 1.0, 1.0, -1.0, 1.0]])
    norm = torch.tensor([4.0, 1.0, 1.0, 0.5, 0.25, 1.0, 2.0, 8.0])
    # scores |W| * norm: row 0 [4 2 3 2 | 1 3 4 8], row 1 [16 1 1 1 | .25 1 2 8] (a three-way tie: lower index)
    expected = torch.tensor([[T, F_, T, F_, F_, F_, T, T],
                             [T, T, F_, F_, F_, F_, T, T]])
    got = wanda_mask(weight, norm, "2:4")
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert not torch.equal(magnitude_mask(weight, "2:4"), expected)


def reference_sparsegpt(weight, hessian, n, m, damp):
    """Row by row, column by column: the OBS step with H^-1 of the columns still free inverted afresh."""
    W, H = weight.double().clone(), hessian.double().clone()
    cols = W.shape[1]
    for j in range(cols):
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    out, keep = torch.zeros_like(W), torch.zeros(W.shape, dtype=torch.bool)
    for r in range(W.shape[0]):
        w = W[r].clone()
        for i in range(cols):
            if i % m == 0:  # saliency w_j^2 / [H_{j:,j:}^-1]_00 of the weights as updated so far
                scores = [float(w[j] ** 2 / torch.linalg.inv(H[j:, j:])[0, 0]) for j in range(i, i + m)]
                for k in sorted(range(m), key=lambda k: (-scores[k], k))[:n]:
                    keep[r, i + k] = True
            if not keep[r, i]:
                hinv = torch.linalg.inv(H[i:, i:])
                w[i:] = w[i:] - w[i] / hinv[0, 0] * hinv[0]
                w[i] = 0.0
        out[r] = w
    return out, keep


def _correlated(tokens, features, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=gen, dtype=torch.float64) @ torch.randn(
        features, features, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(("n", "m", "blocksize"), [(2, 4, 8), (1, 4, 4), (2, 8, 8), (2, 4, 16)])
def test_sparsegpt_equals_the_plain_reference(n, m, blocksize):
    x = _correlated(64, 16, seed=1)
    x[:, 5] = 0.0  # a dead input: weight column 0, H_55 = 1
    weight = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weight[:, 5] = 100.0  # large enough to be kept, were the dead column not zeroed first
    new, mask = sparsegpt_prune(weight, x.T @ x, f"{n}:{m}", blocksize=blocksize, damp=0.01)
    ref_weight, ref_mask = reference_sparsegpt(weight, x.T @ x, n, m, 0.01)
    assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    assert is_exactly_nm(mask, NMPattern(n, m))
    torch.testing.assert_close(new, ref_weight, rtol=1e-9, atol=1e-9)
    assert new.dtype == weight.dtype and bool((new[~mask] == 0).all())
    assert bool((new[:, 5] == 0).all())


def test_sparsegpt_keeps_dtype_and_zeros_in_float32():
    x = _correlated(64, 16, seed=3).float()
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    new, mask = sparsegpt_prune(weight, x.T @ x, "2:4", blocksize=8)
    assert new.dtype == torch.float32 and is_exactly_nm(mask, NMPattern(2, 4)) and bool((new[~mask] == 0).all())
    assert int((new != 0).sum()) == int(mask.sum())  # the kept weights are updated, not zeroed


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    x = _correlated(256, 32, seed=5)
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    new, _ = sparsegpt_prune(weight, x.T @ x, "2:4", blocksize=16)
    error = float((x @ weight.T - x @ new.T).norm())
    magnitude = float((x @ weight.T - x @ (weight * magnitude_mask(weight, "2:4")).T).norm())
    wanda = float((x @ weight.T - x @ (weight * wanda_mask(weight, x.norm(dim=0), "2:4")).T).norm())
    assert error < 0.8 * magnitude and error < wanda


def test_sparsegpt_blocksize_must_be_a_multiple_of_m():
    with pytest.raises(ConfigError, match=r"^sparsity.blocksize=6 is not allowed"):
        sparsegpt_prune(torch.randn(2, 8), torch.eye(8), "2:4", blocksize=6)


# --- the registered methods ---------------------------------------------------------------------
def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _masks(model):
    return {name: topn_mask(torch.randn_like(model.get_submodule(name).weight), NMPattern(2, 4)) for name in ("0", "2")}


@pytest.mark.parametrize("method", ONE_SHOT)
def test_start_from_sets_the_masks_and_the_forward_uses_them(method):
    model = _net()
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    sp = lbc.sparsify(model, method, exclude=[])
    assert sp.prior == method and set(sp.layers) == {"0", "2"}
    with pytest.raises(RuntimeError, match="start_from"):
        sp.finalize()
    masks = _masks(model)
    sp.start_from(masks)
    assert all(torch.equal(sp.layer_mask(n), masks[n]) for n in masks)
    x = torch.randn(5, 8)
    expected = F.linear(F.relu(F.linear(x, dense[0] * masks["0"], model[0].bias)), dense[1] * masks["2"], model[2].bias)
    torch.testing.assert_close(model(x), expected)
    assert sp.is_exact_nm() and sp.report()["scalars"]["density"] == 0.5
    sp.finalize()


def test_sparsegpt_start_from_copies_the_weights_and_training_keeps_pruned_zero():
    model = _net()
    # momentum and weight decay from a dense step before the prune: the state at pruned positions is not zero
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(5, 8)
    model(x).square().sum().backward()
    opt.step()
    sp = lbc.sparsify(model, "sparsegpt", exclude=[])
    masks = _masks(model)
    weights = {n: torch.randn_like(stored_weight(model.get_submodule(n))) for n in masks}
    sp.start_from(masks, weights)
    for name in masks:
        stored = stored_weight(model.get_submodule(name))
        assert torch.equal(stored, weights[name] * masks[name])
    for step in range(3):
        sp.update(step)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for name in masks:
        stored = stored_weight(model.get_submodule(name))
        assert bool((stored[~masks[name]] == 0).all())  # the momentum was masked at the prune
        assert not torch.equal(stored[masks[name]], weights[name][masks[name]])  # the kept weights trained
    model.eval()
    evaluated = model(x)
    model.train()
    assert torch.equal(model(x), evaluated)  # the training forward (no multiply) is the masked one


@pytest.mark.parametrize("method", ONE_SHOT)
def test_state_dict_records_pruned(method):
    model = _net()
    sp = lbc.sparsify(model, method, exclude=[])
    assert sp.state_dict()["pruned"] is False
    sp.start_from(_masks(model))
    state = sp.state_dict()
    assert state["pruned"] is True and type(sp).carried_state(state) == {"pruned": True}
    clone = _net(seed=1)
    sp2 = lbc.sparsify(clone, method, exclude=[])
    clone.load_state_dict(model.state_dict())
    sp2.load_state_dict(state)
    assert sp2.pruned and sp2.is_exact_nm()
    sp2.finalize()


def test_start_from_refuses_wrong_masks():
    model = _net()
    sp = lbc.sparsify(model, "wanda", exclude=[])
    masks = _masks(model)
    with pytest.raises(ConfigError, match=r"^sparsity.prior=wanda: no one-shot mask for layer '2'"):
        sp.start_from({"0": masks["0"]})
    with pytest.raises(ConfigError, match=r"^sparsity.prior=wanda: the one-shot mask of layer '2' is not exactly 2:4"):
        sp.start_from({**masks, "2": torch.ones(4, 16, dtype=torch.bool)})
    assert not sp.pruned


@pytest.mark.parametrize(("method", "options", "key"), [
    ("sparsegpt", {"damp": 2}, "sparsity.damp=2 is not allowed"),
    ("sparsegpt", {"damp": 0}, "sparsity.damp=0 is not allowed"),
    ("sparsegpt", {"blocksize": 6}, "sparsity.blocksize=6 is not allowed"),
    ("sparsegpt", {"blocksize": 4, "pattern": "2:8"}, "sparsity.blocksize=4 is not allowed"),
    ("wanda", {"damp": 0.1}, "sparsity.damp is not an option of method 'wanda'"),
    ("magnitude", {"blocksize": 8}, "sparsity.blocksize is not an option of method 'magnitude'"),
])
def test_option_checks_are_one_line_config_errors(method, options, key):
    with pytest.raises(ConfigError) as err:
        lbc.sparsify(_net(), method, exclude=[], **options)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_sparsegpt_options_defaults():
    sp = lbc.sparsify(_net(), "sparsegpt", exclude=[], pattern="2:8", blocksize=16)
    assert (sp.options.damp, sp.options.blocksize) == (0.01, 16)

"""Grouping, candidate matrix and pattern parsing (paper Sec. 3.1-3.2)."""

import itertools

import pytest
import torch
from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity.nm import (
    NMPattern,
    candidate_matrix,
    eligibility,
    from_groups,
    is_nm,
    parse_pattern,
    to_groups,
)


@pytest.mark.parametrize("spec,n,m", [("2:4", 2, 4), (" 1:16 ", 1, 16), ((4, 8), 4, 8)])
def test_parse(spec, n, m):
    assert parse_pattern(spec) == NMPattern(n, m)


@pytest.mark.parametrize("spec", ["4:4", "5:4", "0:4", "2-4", "abc"])
def test_parse_rejects(spec):
    with pytest.raises(ConfigError, match="sparsity.pattern"):
        parse_pattern(spec)


def test_candidate_matrix_is_combinations_order():
    a = candidate_matrix(NMPattern(2, 4))
    assert a.shape == (6, 4)
    rows = [tuple(int(i) for i in torch.nonzero(r).flatten()) for r in a]
    assert rows == list(itertools.combinations(range(4), 2))
    assert candidate_matrix(NMPattern(4, 8)).shape == (70, 8)
    assert (candidate_matrix(NMPattern(4, 8)).sum(1) == 4).all()


def test_conv_groups_run_along_input_channels():
    o, i, kh, kw = 3, 8, 2, 2
    w = torch.arange(o * i * kh * kw, dtype=torch.float).reshape(o, i, kh, kw)
    groups = to_groups(w, 4)
    assert groups.shape == (o * kh * kw * i // 4, 4)
    # first group: output 0, kernel position (0, 0), input channels 0..3
    assert torch.equal(groups[0], w[0, 0:4, 0, 0])
    assert torch.equal(groups[1], w[0, 4:8, 0, 0])
    assert torch.equal(groups[2], w[0, 0:4, 0, 1])
    assert torch.equal(from_groups(groups, w.shape), w)


def test_linear_groups_and_is_nm():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4]])
    assert torch.equal(to_groups(w, 4), w.reshape(2, 4))
    assert is_nm(w, NMPattern(2, 4))
    assert not is_nm(w, NMPattern(1, 4))
    conv = torch.zeros(2, 8, 3, 3)
    conv[:, 0] = 1  # one non-zero input channel per group of 4
    assert is_nm(conv, NMPattern(1, 4))
    conv[0, 1, 1, 1] = 1
    assert not is_nm(conv, NMPattern(1, 4))


def test_eligibility():
    p = NMPattern(2, 4)
    assert eligibility(nn.Conv2d(16, 8, 3), p) is None
    assert "divisible" in eligibility(nn.Conv2d(3, 8, 3), p)
    assert eligibility(nn.Linear(8, 3), p) is None
    assert "not Conv2d or Linear" in eligibility(nn.BatchNorm2d(8), p)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 4), NMPattern(1, 16),
                                     NMPattern(2, 8), NMPattern(4, 8)])
@pytest.mark.parametrize("shape", [(6, 16), (4, 16, 3, 2)])
def test_candidate_sums_match_the_incidence_matrix(pattern, shape):
    from lbc.sparsity.nm import candidate_sums

    values = torch.randn(shape, dtype=torch.float64)
    expected = to_groups(values, pattern.m) @ candidate_matrix(pattern).double().T
    torch.testing.assert_close(candidate_sums(values, pattern), expected)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 4), NMPattern(2, 8), NMPattern(4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gathered_sums_off_cpu_equal_the_product_on_cpu(pattern, dtype, monkeypatch):
    """GPUs (and compiled graphs) gather the members and sum them; CPUs multiply by A^T: the same sums,
    bit for bit up to N = 2 (the other terms of the product are exact zeros)."""
    from lbc.sparsity.nm import group_candidate_sums

    groups = torch.randn(64, pattern.m).to(dtype)
    on_cpu = group_candidate_sums(groups, pattern)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the gather path, as off the CPU
    gathered = group_candidate_sums(groups, pattern)
    assert gathered.dtype == on_cpu.dtype == dtype and gathered.shape == (64, pattern.num_candidates)
    if pattern.n <= 2:
        assert torch.equal(gathered, on_cpu)
    else:
        torch.testing.assert_close(gathered.float(), on_cpu.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("count", [2, 4, 6, 8, 16])
@pytest.mark.parametrize("descending", [False, True])
def test_rank_columns_is_a_stable_sort_position(count, descending):
    from lbc.sparsity.nm import rank_columns

    gen = torch.Generator().manual_seed(count)
    values = torch.randint(0, 3, (300, count), generator=gen).float()  # many ties
    values[:, 0] = values[:, 0].masked_fill(values[:, 0] == 2, float("inf"))
    ranks = rank_columns(values.unbind(1), descending=descending)
    assert all(r.dtype == torch.int8 for r in ranks)
    expected = torch.sort(values, dim=1, stable=True, descending=descending).indices.argsort(dim=1)
    assert torch.equal(torch.stack(ranks, 1).long(), expected)


def _reference_topn(weight, pattern):
    """Top-N |w| per group by a stable descending sort: ties keep the lower index."""
    groups = to_groups(weight.abs(), pattern.m)
    order = torch.sort(groups, dim=1, stable=True, descending=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, : pattern.n], True)
    return from_groups(keep, weight.shape)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 4), NMPattern(2, 8),
                                     NMPattern(4, 8), NMPattern(1, 16), NMPattern(4, 16)])
@pytest.mark.parametrize("shape", [(6, 16), (4, 16, 3, 2)])
def test_topn_mask_keeps_the_n_largest_magnitudes(pattern, shape):
    from lbc.sparsity.nm import topn_mask

    gen = torch.Generator().manual_seed(pattern.m)
    smooth = torch.randn(shape, generator=gen)
    mask = topn_mask(smooth, pattern)
    assert mask.dtype == torch.bool and mask.shape == smooth.shape
    assert torch.equal(mask, _reference_topn(smooth, pattern))
    assert (to_groups(mask, pattern.m).sum(1) == pattern.n).all()
    tied = torch.randint(-2, 3, shape, generator=gen).float()  # equal |w| and signed pairs
    mask = topn_mask(tied, pattern)
    assert (to_groups(mask, pattern.m).sum(1) == pattern.n).all()
    if pattern.m <= 8:  # the ranked path: ties keep the lower index (topk beyond: unspecified)
        assert torch.equal(mask, _reference_topn(tied, pattern))


@pytest.mark.parametrize("count", [2, 4, 6, 8])
@pytest.mark.parametrize("descending", [False, True])
def test_rank_along_is_rank_columns_in_a_few_kernels(count, descending):
    """The broadcast ranking used off the CPU orders exactly as the pairwise one (ties included)."""
    from lbc.sparsity.nm import rank_along, rank_columns

    gen = torch.Generator().manual_seed(count)
    values = torch.randint(0, 3, (5, count, 7), generator=gen).float()  # many ties
    values[0] = torch.randn(count, 7, generator=gen)
    expected = torch.stack(rank_columns(values.unbind(1), descending=descending), 1)
    assert torch.equal(rank_along(values, 1, descending=descending).to(torch.int8), expected)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 8)])
def test_topn_mask_off_the_cpu_path_keeps_the_same_weights(pattern):
    """topn_mask's broadcast path (taken on a GPU) gives the CPU path's mask, ties included."""
    from lbc.sparsity import nm

    gen = torch.Generator().manual_seed(pattern.m)
    for shape in ((8, 16), (4, 16, 3, 3)):
        weight = torch.randint(-2, 3, shape, generator=gen).float()
        on_cpu = nm.topn_mask(weight, pattern)
        grouped = weight.abs().unflatten(1, (shape[1] // pattern.m, pattern.m))
        off_cpu = (nm.rank_along(grouped, 2, descending=True) < pattern.n).flatten(1, 2)
        assert torch.equal(off_cpu, on_cpu)

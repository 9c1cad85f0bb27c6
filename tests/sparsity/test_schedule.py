"""Eq. 6: cumulative candidates removed per group, against tables computed by hand."""

import pytest

from lbc.sparsity.schedule import removed_total

# t_i = 0, t_f = 10, epochs 0..10; ceil((C-1) * (1 - (1 - t/10)^3)), worked out on paper.
PAPER = {
    6: [0, 2, 3, 4, 4, 5, 5, 5, 5, 5, 5],  # 2:4
    4: [0, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3],  # 1:4
    28: [0, 8, 14, 18, 22, 24, 26, 27, 27, 27, 27],  # 2:8
    16: [0, 5, 8, 10, 12, 14, 15, 15, 15, 15, 15],  # 1:16
}


@pytest.mark.parametrize("candidates", sorted(PAPER))
def test_paper_counts(candidates):
    assert [removed_total(t, 0, 10, candidates) for t in range(11)] == PAPER[candidates]


def test_released_rounding_removes_one_fewer_at_every_epoch_between():
    # (C-1) - ceil((C-1) * (1 - t/10)^3) for C = 6, by hand.
    released = [removed_total(t, 0, 10, 6, rounding="released") for t in range(11)]
    assert released == [0, 1, 2, 3, 3, 4, 4, 4, 4, 4, 5]
    assert all(0 <= p - r <= 1 for p, r in zip(PAPER[6], released, strict=True))
    assert [p - r for p, r in zip(PAPER[6], released, strict=True)] == [0] + [1] * 9 + [0]


@pytest.mark.parametrize("candidates", [6, 4, 28, 16, 70, 120])  # 2:4, 1:4, 2:8, 1:16, 4:8, 2:16
@pytest.mark.parametrize("exponent", [3, 4])
@pytest.mark.parametrize("t_i, t_f", [(0, 60), (30, 60), (0, 150), (0, 200)])
def test_released_rounding_count_of_epochs_with_one_fewer(candidates, exponent, t_i, t_f):
    """Every whole epoch strictly between t_i and t_f, none outside (59 of 59 at t_i = 0, t_f = 60), even
    where the exact value is whole (2:8 at epoch 20 of 60: 27 * (2/3)^3 = 8, a hair more in floats)."""
    fewer = [t for t in range(t_f + 5)
             if removed_total(t, t_i, t_f, candidates, exponent) - removed_total(t, t_i, t_f, candidates, exponent,
                                                                                 rounding="released") == 1]
    same = [t for t in range(t_f + 5)
            if removed_total(t, t_i, t_f, candidates, exponent)
            == removed_total(t, t_i, t_f, candidates, exponent, rounding="released")]
    assert fewer == list(range(t_i + 1, t_f)) and len(fewer) == t_f - t_i - 1
    assert same == [*range(t_i + 1), *range(t_f, t_f + 5)]


def test_before_t_i_and_after_t_f():
    assert removed_total(3, 5, 10, 6) == 0
    assert removed_total(5, 5, 10, 6) == 0
    assert removed_total(10, 5, 10, 6) == 5
    assert removed_total(99, 5, 10, 6) == 5
    # shifted start: t = 6 is x = 1/5 of the way: ceil(5 * (1 - 0.8^3)) = ceil(2.44) = 3
    assert removed_total(6, 5, 10, 6) == 3


def test_exact_arithmetic_at_integer_boundaries():
    # 2:8, t_f = 10, step 150 of 45 per epoch: t = 10/3, 27 * (1 - (2/3)^3) = 19 exactly. The float
    # 150/45 is a hair above 10/3, so taking it literally would give ceil(19 + eps) = 20.
    assert removed_total(150 / 45, 0, 10, 28) == 19
    assert removed_total(1, 0, 3, 28) == 19


def test_exponent_four_removes_faster_early():
    assert removed_total(1, 0, 10, 6, exponent=4) >= removed_total(1, 0, 10, 6, exponent=3)
    # ceil(5 * (1 - 0.9^4)) = ceil(1.7195) = 2; ceil(5 * (1 - 0.5^4)) = ceil(4.6875) = 5
    assert removed_total(1, 0, 10, 6, exponent=4) == 2
    assert removed_total(5, 0, 10, 6, exponent=4) == 5


def test_fractional_epochs_are_monotone():
    counts = [removed_total(k / 7, 0, 4, 28) for k in range(0, 29)]
    assert counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == 27

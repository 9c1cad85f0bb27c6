"""Candidate-removal schedules: pure functions of the (possibly fractional) epoch.

``paper`` rounding uses exact rational arithmetic (``fractions.Fraction``) so that ``ceil`` never
lands on the wrong side of an integer because of float round-off: every DDP rank and every resume
agrees. A float epoch such as ``step / steps_per_epoch`` is read back as the fraction it stands
for (denominators up to 10^6), so ``150 / 45`` counts as exactly 10/3.

``released`` rounding is the authors' code float for float (Python floats, their order of
operations): ``(C - 1) - ceil((C - 1) * (1 - x)^e)``, the floor where the paper takes the ceil of
``(C - 1) * (1 - (1 - x)^e)``. The two agree only where that value is a whole number and floats
compute it exactly, so released removes one candidate fewer at every whole epoch strictly between
t_i and t_f (59 of the 59 epochs 1..59 at t_i = 0, t_f = 60; ``tests/sparsity/test_schedule.py``
counts them). Computed for every N:M with M = 4, 8 or 16, exponents 3 and 4 and whole epochs with
t_f - t_i <= 300 (the float value depends on t - t_i and t_f - t_i only): no exception. The exact
whole numbers come out a hair high in floats: for 2:8 (C = 28) at epoch 20 of t_f = 60,
``27 * (1 - 20/60)**3`` is 8.000000000000002, so it keeps 9 + 1 candidates where exact arithmetic
keeps 8 + 1. (It is not a law: 1:9 at epoch 1 of t_f = 2 computes 8 * 0.5**3 = 1 exactly, and the
two agree.) Both agree at t <= t_i and t >= t_f.
"""

from __future__ import annotations

import math
from fractions import Fraction

ROUNDINGS = ("paper", "released")
_MAX_DENOMINATOR = 10**6


def removed_total(
    t: float,
    t_i: float,
    t_f: float,
    num_candidates: int,
    exponent: int = 3,
    rounding: str = "paper",
) -> int:
    """Total candidates removed per group by epoch ``t`` (paper Eq. 6, cumulative form).

    ``paper``: ``ceil((C - 1) * (1 - (1 - x)^e))`` with ``x = (t - t_i) / (t_f - t_i)``, exactly.
    ``released``: the authors' code in floats, ``(C - 1) - ceil((C - 1) * (1 - x)^e)``: one fewer
    at every t strictly between t_i and t_f (see the module docstring).
    0 before ``t_i``, ``C - 1`` from ``t_f`` on (one candidate survives; with ``t_i == t_f`` all
    at once at ``t_f``). ``rounding`` is one of :data:`ROUNDINGS` (``LBCOptions`` checks it).
    """
    last = num_candidates - 1
    if rounding == "released":
        t, t_i, t_f = float(t), float(t_i), float(t_f)
        if t >= t_f:
            return last
        if t <= t_i:
            return 0
        return last - math.ceil(last * (1 - (t - t_i) / (t_f - t_i)) ** exponent)
    t, t_i, t_f = (Fraction(v).limit_denominator(_MAX_DENOMINATOR) for v in (t, t_i, t_f))
    if t >= t_f:
        return last
    if t <= t_i:
        return 0
    remaining = (1 - (t - t_i) / (t_f - t_i)) ** exponent
    return math.ceil(last * (1 - remaining))

"""Candidate-removal schedules: pure functions of the (possibly fractional) epoch.

Exact rational arithmetic (``fractions.Fraction``) so that ``ceil`` never lands on the wrong side
of an integer because of float round-off: every DDP rank and every resume agrees.
"""

from __future__ import annotations

import math
from fractions import Fraction

ROUNDINGS = ("paper", "released")


def removed_total(
    t: float,
    t_i: float,
    t_f: float,
    num_candidates: int,
    exponent: int = 3,
    rounding: str = "paper",
) -> int:
    """Total candidates removed per group by epoch ``t`` (paper Eq. 6, cumulative form).

    ``paper``: ``ceil((C - 1) * (1 - (1 - x)^e))`` with ``x = (t - t_i) / (t_f - t_i)``.
    ``released``: the authors' code, ``(C - 1) - ceil((C - 1) * (1 - x)^e)``, one fewer at some t.
    0 before ``t_i``, ``C - 1`` from ``t_f`` on (one candidate survives).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}; choose from {ROUNDINGS}")
    last = num_candidates - 1
    t, t_i, t_f = Fraction(t), Fraction(t_i), Fraction(t_f)
    if t >= t_f:
        return last
    if t <= t_i:
        return 0
    remaining = (1 - (t - t_i) / (t_f - t_i)) ** exponent
    if rounding == "paper":
        return math.ceil(last * (1 - remaining))
    return last - math.ceil(last * remaining)

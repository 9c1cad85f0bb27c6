"""N:M patterns: parsing, grouping along the input channel, candidate matrix, ranking, N:M check.

Pure functions shared by every method (paper Sec. 3.1): a weight ``W`` is reorganised as
``(G, M)``, each row holding ``M`` consecutive *input-channel* weights of one output channel
and kernel position, and an N:M weight has at most ``N`` non-zeros in every row (Eq. 1).
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lbc.errors import ConfigError

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zeros in every ``m`` consecutive weights."""

    n: int
    m: int

    @property
    def num_candidates(self) -> int:
        """C(M, N): the size of the combination collection of one group (paper Eq. 2)."""
        return math.comb(self.m, self.n)

    @property
    def density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(spec: str | NMPattern | tuple[int, int], key: str = "sparsity.pattern") -> NMPattern:
    """Parse ``"N:M"`` (or ``(N, M)``) and check 1 <= N < M; a one-line ConfigError otherwise."""
    if isinstance(spec, NMPattern):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        n, m = (int(v) for v in spec)
    else:
        match = _PATTERN.match(str(spec))
        if not match:
            raise ConfigError(f"{key}={spec!r} is not an N:M pattern; write it like 2:4 (1 <= N < M)")
        n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ConfigError(f"{key}={n}:{m} is not allowed; need 1 <= N < M (e.g. 2:4, 1:4, 2:8, 1:16)")
    return NMPattern(n, m)


@functools.cache
def _candidate_matrix_cpu(n: int, m: int) -> torch.Tensor:
    subsets = list(itertools.combinations(range(m), n))
    matrix = torch.zeros(len(subsets), m)
    rows = torch.arange(len(subsets)).repeat_interleave(n)
    matrix[rows, torch.tensor(subsets).flatten()] = 1.0
    return matrix


def candidate_matrix(pattern: NMPattern, device: torch.device | str | None = None) -> torch.Tensor:
    """Incidence matrix ``A`` (C x M) of the N-subsets, in ``itertools.combinations`` order.

    ``A[j, i] = 1`` iff weight ``i`` of a group belongs to candidate ``j`` (paper Eq. 2 and the
    indicator of Eq. 8). Built once per pattern and cached.
    """
    return _candidate_matrix_cpu(pattern.n, pattern.m).to(device)


@functools.cache
def candidates_containing(pattern: NMPattern) -> tuple[tuple[int, ...], ...]:
    """For each position i of a group, the indices of the candidates that contain it (rows of A^T)."""
    subsets = list(itertools.combinations(range(pattern.m), pattern.n))
    return tuple(tuple(j for j, s in enumerate(subsets) if i in s) for i in range(pattern.m))


def input_dim(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """Size of the dimension N:M groups run along: the input channels (per conv group)."""
    return int(weight_shape[1])


def to_groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """Reorganise a Linear (O, I) or Conv (O, I, kh, kw) tensor as (G, M) along the input channel."""
    if tensor.dim() > 2:
        tensor = tensor.movedim(1, -1)  # (O, kh, kw, I): input channels last and consecutive
    return tensor.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_groups`: (G, M) back to the weight's own layout."""
    if len(shape) > 2:
        moved = (shape[0], *shape[2:], shape[1])
        return groups.reshape(moved).movedim(-1, 1)
    return groups.reshape(shape)


def grouped_product(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """``a * b`` (weight-shaped) as a contiguous (G, M) tensor in :func:`to_groups` order, in one pass.

    For a Conv weight the product is written straight into the input-channels-last layout, so
    grouping costs no copy of its own (``to_groups(a * b)`` would write the product twice).
    """
    if a.dim() <= 2 or torch.compiler.is_compiling():  # traced: the compiler fuses the copy itself
        return to_groups(a * b, m)
    moved = (a.shape[0], *a.shape[2:], a.shape[1])
    out = torch.empty(moved, dtype=torch.result_type(a, b), device=a.device)
    torch.mul(a.movedim(1, -1), b.movedim(1, -1), out=out)
    return out.view(-1, m)


@functools.cache
def _candidate_members(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(C * N,) int64: the members of every candidate, candidate after candidate (combinations order)."""
    return torch.tensor([i for s in itertools.combinations(range(m), n) for i in s], device=device)


def group_candidate_sums(groups: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(G, C) from (G, M) ``groups``: for every group, the sum over each candidate's members.

    On CPU one skinny product with the candidate matrix, ``groups @ A^T``: a single pass that
    writes the (G, C) result contiguously, about 2.5x faster than one strided pass per candidate.
    Elsewhere (and traced by ``torch.compile``) a gather of the members and a sum: two kernels, and
    no TF32 rounding of a GPU matmul. Both equal the members' sums bit for bit for N <= 2 (the
    product's other terms are exact zeros); beyond, up to the order of the additions.
    """
    if torch.compiler.is_compiling():  # a constant of the graph (no functools.cache under dynamo)
        subsets = itertools.combinations(range(pattern.m), pattern.n)
        members = torch.tensor([i for s in subsets for i in s], device=groups.device)
    elif groups.device.type == "cpu":
        return groups @ candidate_matrix(pattern, groups.device).to(groups.dtype).T
    else:
        members = _candidate_members(pattern.n, pattern.m, groups.device)
    return groups.index_select(1, members).unflatten(1, (pattern.num_candidates, pattern.n)).sum(2)


def candidate_sums(values: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(G, C): for every group, the sum of ``values`` (weight-shaped) over each candidate's members.

    The sum of Eq. 9-10 (and of the magnitude/gradient criteria): :func:`group_candidate_sums` of
    the values grouped along the input channel.
    """
    return group_candidate_sums(to_groups(values, pattern.m), pattern)


def rank_columns(columns: Sequence[torch.Tensor], descending: bool = False) -> list[torch.Tensor]:
    """Position of each column in a per-element sort of ``columns``, ties to the lower index (int8).

    ``out[i]`` counts, elementwise, the columns that come before column ``i``: smaller values
    (larger with ``descending``), or equal values at a lower index. Each pair is compared once,
    ``C(C-1)/2`` vectorised comparisons and no copy of the inputs: for the small C of N:M groups
    several times faster on CPU than ``sort`` or ``topk``. At most 127 columns (int8 counters).
    """
    first = torch.gt if descending else torch.lt
    device = columns[0].device
    out = [torch.full(columns[0].shape, i, dtype=torch.int8, device=device) for i in range(len(columns))]
    for i in range(len(columns)):
        for j in range(i + 1, len(columns)):
            later_first = first(columns[j], columns[i]).view(torch.int8)  # else i (lower index) goes first
            out[i] += later_first
            out[j] -= later_first
    return out


def rank_along(values: torch.Tensor, dim: int, descending: bool = False) -> torch.Tensor:
    """:func:`rank_columns` of the slices of ``values`` along ``dim``, in a few kernels (int64 positions).

    One broadcast comparison of every pair (a (..., K, K, ...) bool tensor) instead of C(K-1)/2
    comparisons and K(K-1) counter updates: about 10x slower on CPU, but a handful of launches
    where each launch costs more than the data (a GPU). Same order, ties to the lower index.
    """
    k = values.shape[dim]
    ranked = values.unsqueeze(dim + 1)  # position i along dim, the others along dim + 1
    others = values.unsqueeze(dim)
    lower = torch.ones(k, k, dtype=torch.bool, device=values.device).tril(-1)  # [i, j]: j < i, j wins ties
    lower = lower.view(k, k, *([1] * (values.dim() - dim - 1)))
    if descending:
        before = torch.where(lower, others >= ranked, others > ranked)
    else:
        before = torch.where(lower, others <= ranked, others < ranked)
    return before.sum(dim + 1)


_RANKED_TOPN_MAX_M = 8


def topn_mask(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Bool mask, weight-shaped, keeping the N largest ``|w|`` of every group (SR-STE's and ASP's mask).

    For M <= 8 a weight is kept when fewer than N of its group rank ahead of it
    (:func:`rank_columns` on strided views of the weight on CPU, :func:`rank_along` elsewhere: ties
    keep the lower index). Larger M uses ``topk`` over (G, M), whose choice among equal magnitudes
    is unspecified.
    """
    magnitude = weight.detach().abs()
    if pattern.m > _RANKED_TOPN_MAX_M:
        groups = to_groups(magnitude, pattern.m)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
        keep.scatter_(1, groups.topk(pattern.n, dim=1).indices, True)
        return from_groups(keep, weight.shape)
    grouped = magnitude.unflatten(1, (weight.shape[1] // pattern.m, pattern.m))
    if weight.device.type != "cpu":  # a few kernels instead of ~30 small ones
        return (rank_along(grouped, 2, descending=True) < pattern.n).flatten(1, 2)
    ahead = rank_columns(grouped.unbind(2), descending=True)
    return torch.stack([rank < pattern.n for rank in ahead], 2).flatten(1, 2)


def is_nm(tensor: torch.Tensor, pattern: NMPattern) -> bool:
    """True iff every group of M consecutive input-channel entries has at most N non-zeros."""
    if input_dim(tensor.shape) % pattern.m:
        return False
    return bool(((to_groups(tensor, pattern.m) != 0).sum(dim=1) <= pattern.n).all())


def is_exactly_nm(mask: torch.Tensor, pattern: NMPattern) -> bool:
    """True iff every group of M consecutive input-channel entries keeps exactly N (a finished N:M mask).

    Stricter than :func:`is_nm`: a mask that keeps fewer than N somewhere (an emptied group) is
    N:M by the "at most" reading but is not the pattern's density.
    """
    if input_dim(mask.shape) % pattern.m:
        return False
    return bool(((to_groups(mask, pattern.m) != 0).sum(dim=1) == pattern.n).all())


def eligibility(module: nn.Module, pattern: NMPattern) -> str | None:
    """Why ``module`` cannot be made N:M, or None when it can (Conv2d/Linear, I divisible by M).

    Reads the layer's sizes, not its weight: no parametrisation's forward runs.
    """
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"{type(module).__name__} is not Conv2d or Linear"
    width = module.in_features if isinstance(module, nn.Linear) else module.in_channels // module.groups
    if width % pattern.m:
        return f"input dimension {width} is not divisible by M={pattern.m}"
    return None

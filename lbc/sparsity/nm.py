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


_STRIDED_SUMS_MAX_CANDIDATES = 16


def candidate_sums(values: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(G, C): for every group, the sum of ``values`` (weight-shaped) over each candidate's members.

    The sum of Eq. 9-10 (and of the magnitude/gradient criteria). For C <= 16 it adds strided
    views of ``values`` straight into the output, one pass per candidate and vectorised over
    all groups: about 2x faster on CPU than the (G, M) copy and the skinny (G, M) @ (M, C)
    product used for larger C.
    """
    if pattern.num_candidates > _STRIDED_SUMS_MAX_CANDIDATES:
        return to_groups(values, pattern.m) @ candidate_matrix(pattern, values.device).to(values.dtype).T
    moved = values.movedim(1, -1) if values.dim() > 2 else values  # a view: input channels last
    columns = moved.unflatten(-1, (moved.shape[-1] // pattern.m, pattern.m)).unbind(-1)
    subsets = itertools.combinations(range(pattern.m), pattern.n)
    if torch.compiler.is_compiling():  # traced: no out= views; the compiler fuses the sums itself
        sums = [sum(columns[i] for i in members[1:]) + columns[members[0]] for members in subsets]
        return torch.stack(sums, -1).reshape(-1, pattern.num_candidates)
    out = values.new_empty(*columns[0].shape, pattern.num_candidates)
    for j, members in enumerate(subsets):
        if len(members) == 1:
            out[..., j].copy_(columns[members[0]])
            continue
        torch.add(columns[members[0]], columns[members[1]], out=out[..., j])
        for i in members[2:]:
            out[..., j].add_(columns[i])
    return out.reshape(-1, pattern.num_candidates)


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


_RANKED_TOPN_MAX_M = 8


def topn_mask(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Bool mask, weight-shaped, keeping the N largest ``|w|`` of every group (SR-STE's and ASP's mask).

    For M <= 8 a weight is kept when fewer than N of its group rank ahead of it
    (:func:`rank_columns` on strided views of the weight: ties keep the lower index). Larger M
    uses ``topk`` over (G, M), whose choice among equal magnitudes is unspecified.
    """
    magnitude = weight.detach().abs()
    if pattern.m > _RANKED_TOPN_MAX_M:
        groups = to_groups(magnitude, pattern.m)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
        keep.scatter_(1, groups.topk(pattern.n, dim=1).indices, True)
        return from_groups(keep, weight.shape)
    columns = magnitude.unflatten(1, (weight.shape[1] // pattern.m, pattern.m)).unbind(2)
    ahead = rank_columns(columns, descending=True)
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

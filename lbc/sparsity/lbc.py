"""LBC, "Learning Best Combination" (Zhang et al., NeurIPS 2022), paper Sec. 3.3 and Alg. 1.

Every group of M weights owns one learnable score per candidate N-subset (Eq. 8-9). Candidates
are removed, lowest score first, on the gradual schedule of Eq. 6 between ``t_i`` and ``t_f``;
the mask keeps every weight that some alive candidate contains (Eq. 8), the forward uses
``B * W`` (Eq. 7) and the scores learn through the straight-through estimator (Eq. 9-10).

Where the authors' released code differs from the paper, the difference is an option:
``score_init="released"`` (1 / C(M-1, N-1); Alg. 1 starts every score at 1),
``rounding="released"`` (floor instead of ceil in Eq. 6: one candidate fewer removed at every epoch
strictly between ``t_i`` and ``t_f``, see :mod:`lbc.sparsity.schedule`), ``exponent=4`` with ``t_f``
at 2/3 of the epochs (their DeiT recipe), ``freeze_scores=False`` (their DeiT script, below) and
``score_weight_decay`` (their code decays scores like weights: the default, None, does so too).
``update_every="step"`` applies Eq. 6 at fractional epochs instead of once per epoch.

``removal`` chooses how candidates leave:

- ``paper`` (default): removal is final, as Alg. 1 says: an ``alive`` set that only shrinks, the
  lowest-valued alive candidates going at each increase of Eq. 6's count.
- ``released``: the authors' code. Before every step the mask is re-chosen as the top-(C - k)
  candidates of every group by signed score, k being Eq. 6's count; the scores of the k others are
  set to 0 and get no gradient, but SGD momentum moves them off 0, so a removed candidate can come
  back. Scores that are exactly 0 rank below every other (the code subtracts 1000 from them).
  Ties go to the lower candidate index, as in ``paper`` mode.

``freeze_scores`` (default True) says what the scores do once one candidate is left in every
group (Eq. 6's count at C - 1: at ``t_f`` with released rounding, with the paper's ceil often some
epochs before, e.g. from epoch 25 of t_f = 60 for 2:4). True: they stop training (no gradient, so
no optimizer update or weight decay either), as the authors' ResNet script does; in both removal
modes the mask then never changes again, so this only saves their work. False: they keep
training, as the authors' DeiT script does (AdamW keeps updating and decaying them); what that can
change depends on ``removal``:

- ``paper``: nothing but the scores. Removal is final, the one alive candidate of every group is
  its survivor for good, and only the survivor's score gets a gradient; the model is the same as
  with frozen scores (the scores' values and optimizer state in checkpoints differ).
- ``released``: the survivor. Before every step the alive candidate is re-chosen as the top-1 by
  signed score and the others' scores are zeroed, as at every step before; the alive score still
  learns and decays, and optimizer momentum can move a zeroed score above it, so a group's survivor
  (its N kept weights) can change at any later step. The model stays exactly N:M.

``t_i == t_f`` (Table 5's (0, 0) row: N:M from the first step) is our decision, documented here
because the released code cannot run it (it divides by ``t_f - t_i``):

- ``paper``: a one-shot removal at ``t_f`` of all but the best-valued candidate, after the scores
  learned with every candidate alive for ``t_f`` epochs. At ``t_f = 0`` nothing has been learned and
  every score is equal, so the survivor would be an arbitrary index: refused (one-line ConfigError)
  for the learned criteria and the gradient criterion; ``magnitude`` is fine (a one-shot
  magnitude choice at the first step).
- ``released``: from ``t_f`` on the mask is the top-(C - k) by score at every step, and every
  candidate's score keeps learning through Eq. 9's straight-through gradient (not only the
  alive ones'; removed scores are not zeroed) and the scores are never frozen (whatever
  ``freeze_scores`` says): the scores keep choosing the survivor. With the alive-only gradient of the released code the candidates
  dropped at the first step would never get a gradient, and the mask would be index order
  forever. At the very first step all scores are equal, and as ties remove the lower index
  first, the last candidate is kept for that one step.

For language models (MaskLLM's setting, not the paper's) three more options:

- ``prior`` (magnitude | wanda | sparsegpt): every group starts from the candidate a one-shot mask
  keeps. The task computes those masks once before training and hands them to
  :meth:`LBC.start_from`, which adds ``prior_margin`` to that candidate's score; it then goes last
  under ``removal=paper`` (first under ``released``), so the prior's mask is the final mask unless
  the scores learn otherwise. With a prior, ``t_i == t_f == 0`` under paper removal is allowed: the
  prior's candidate is the one-shot survivor.
- ``train_weights=false``: every parameter of the model but the scores is frozen at attach; only
  the mask learns, and the masked layers' weight gradient is never computed.
- ``score_dtype`` (float32 | bfloat16): the dtype the scores are stored and trained in (see
  :class:`LBCOptions`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, is_number, require
from lbc.sparsity.base import MaskParametrization, SparsityMethod, float_view, mask_is_full, masked_gradient
from lbc.sparsity.nm import (
    NMPattern,
    candidate_matrix,
    candidates_containing,
    from_groups,
    group_candidate_sums,
    grouped_product,
    parse_pattern,
    rank_along,
    rank_columns,
    to_groups,
)
from lbc.sparsity.options import PRIORS, SparsityOptions
from lbc.sparsity.registry import METHODS
from lbc.sparsity.schedule import ROUNDINGS, removed_total

log = logging.getLogger(__name__)

# Table 6: which alive candidates go first. ``score``: the learned scores (LBC); ``score_inverse``:
# the highest-scored first; ``magnitude``: sum of |w| over the candidate's members; ``gradient``:
# sum of |w * dL/dW_eff| over its members, accumulated over the steps since the last removal.
# For magnitude and gradient the scores are kept (same state, same checkpoints) but never learned.
CRITERIA = ("score", "score_inverse", "magnitude", "gradient")
LEARNED_CRITERIA = ("score", "score_inverse")
REMOVALS = ("paper", "released")
# float16 is not offered: Adam's second moment of score gradients below ~2e-4 underflows to 0 in it (and
# eps=1e-8 with it), so AdamW's step divides by (almost) zero: NaN scores; bfloat16 saves as much memory.
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LBCOptions(SparsityOptions):
    """LBC (paper Sec. 3.3, Alg. 1): gradual removal of candidates on Eq. 6 between ``t_i`` and ``t_f``."""

    method: str = "lbc"
    t_i: float = 0.0  # first epoch of candidate removal (paper: 0)
    t_f: float | None = None  # last epoch (required; paper: half the training epochs)
    exponent: int = 3  # Eq. 6's exponent (released DeiT recipe: 4)
    rounding: str = "paper"  # paper: ceil in Eq. 6 | released: floor, one fewer at every epoch in (t_i, t_f)
    update_every: str = "epoch"  # epoch (Alg. 1) | step: Eq. 6 at fractional epochs
    score_init: Any = "paper"  # paper: 1 | released: 1/C(M-1,N-1) | a number
    score_weight_decay: float | None = None  # None: the optimizer's weight decay (as released)
    score_lr: float | None = None  # the scores' own learning rate (the schedule scales it alike); None: optim.lr
    criterion: str = "score"  # Table 6: score | score_inverse | magnitude | gradient
    removal: str = "paper"  # paper: removal is final (alive set) | released: signed-score top-k every step
    freeze_scores: bool = True  # once one candidate is left (released ResNet script) | false: train on (DeiT script)
    prior: str | None = None  # one-shot mask every group starts from: magnitude | wanda | sparsegpt | null (none)
    prior_margin: float = 1.0  # added to the score of the prior's candidate (> 0): it starts ahead of the others
    train_weights: bool = True  # false: every parameter but the scores is frozen, only the mask learns (MaskLLM)
    # The dtype the scores (C(M,N)/M per weight: 1.5 at 2:4, ~10.5e9 for a 7B model), their gradient and
    # optimizer state are kept in: float32 | bfloat16 (masks and alive sets stay bool). bfloat16 halves that
    # memory and chooses float32's survivors except where float32's scores tie within bfloat16 precision
    # (8 significant bits; a tie removes the lower index). An update below half a unit in the last place is
    # lost: 2^-8 at a score of 1, so AdamW at lr 1e-3 never moves a score of 1. Under removal=paper a common
    # offset of the scores changes no choice, so score_init=0 gives bfloat16 scores their finest steps.
    score_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.t_f is not None, "sparsity.t_f", self.t_f,
                "lbc needs t_f, the epoch by which one candidate is left (the paper uses half the epochs)")
        require(is_number(self.t_i) and self.t_i >= 0, "sparsity.t_i", self.t_i, "use a number >= 0")
        require(is_number(self.t_f) and self.t_f >= self.t_i, "sparsity.t_f", self.t_f,
                f"use a number >= sparsity.t_i={self.t_i}")
        require(isinstance(self.exponent, int) and not isinstance(self.exponent, bool) and 1 <= self.exponent <= 16,
                "sparsity.exponent", self.exponent, "use an integer from 1 to 16 (paper: 3; released DeiT: 4)")
        require(self.rounding in ROUNDINGS, "sparsity.rounding", self.rounding, f"choose from: {', '.join(ROUNDINGS)}")
        require(self.update_every in ("epoch", "step"), "sparsity.update_every", self.update_every,
                "choose from: epoch, step")
        require(self.score_init in ("paper", "released") or is_number(self.score_init), "sparsity.score_init",
                self.score_init, "use paper (1), released (1/C(M-1,N-1)) or a number")
        require(self.score_lr is None or is_number(self.score_lr) and self.score_lr > 0, "sparsity.score_lr",
                self.score_lr, "use a positive number or null (the optimizer's lr)")
        require(self.score_weight_decay is None or is_number(self.score_weight_decay) and self.score_weight_decay >= 0,
                "sparsity.score_weight_decay", self.score_weight_decay, "use a number >= 0 or null")
        require(self.criterion in CRITERIA, "sparsity.criterion", self.criterion, f"choose from: {', '.join(CRITERIA)}")
        require(self.removal in REMOVALS, "sparsity.removal", self.removal, f"choose from: {', '.join(REMOVALS)}")
        require(self.removal == "paper" or self.criterion == "score", "sparsity.removal", self.removal,
                f"removal=released re-selects by the learned scores; criterion={self.criterion} needs removal=paper")
        require(isinstance(self.freeze_scores, bool), "sparsity.freeze_scores", self.freeze_scores, "use true or false")
        require(self.prior is None or self.prior in PRIORS, "sparsity.prior", self.prior,
                f"choose from: {', '.join(PRIORS)}, or null (no one-shot mask)")
        require(self.prior is None or self.criterion in LEARNED_CRITERIA, "sparsity.prior", self.prior,
                f"the prior boosts the learned scores, which criterion={self.criterion} does not use; "
                "use criterion=score (or score_inverse) or prior=null")
        require(is_number(self.prior_margin) and self.prior_margin > 0, "sparsity.prior_margin", self.prior_margin,
                "use a number > 0 (the prior's candidate starts that far ahead)")
        require(isinstance(self.train_weights, bool), "sparsity.train_weights", self.train_weights, "use true or false")
        require(self.train_weights or self.criterion in LEARNED_CRITERIA, "sparsity.train_weights", self.train_weights,
                f"with frozen weights only the scores learn, and criterion={self.criterion} learns none: "
                "use criterion=score (or score_inverse) or train_weights=true")
        require(self.score_dtype in SCORE_DTYPES, "sparsity.score_dtype", self.score_dtype,
                f"choose from: {', '.join(SCORE_DTYPES)} (not float16: AdamW's state underflows in it)")
        if self.removal == "paper" and self.t_f == 0 and self.criterion != "magnitude" and self.prior is None:
            raise ConfigError(
                f"sparsity.t_i=sparsity.t_f=0 with removal=paper removes all candidates but one before any "
                f"{'score' if self.criterion != 'gradient' else 'gradient'} is learned: the survivor would be an "
                f"arbitrary index; use sparsity.removal=released (the scores keep choosing every step), t_f > 0 or "
                f"a sparsity.prior")


class _LBCMask(torch.autograd.Function):
    """Forward ``B * W`` (Eq. 7); backward: masked weight gradient and the STE score gradient.

    ``mask=None`` means a full mask and ``alive=None`` every candidate alive (no multiply by
    either); ``folded`` means the stored weight is ``B * W`` already (its pruned entries are exact
    zeros, :class:`~lbc.sparsity.base.MaskParametrization`), so the forward returns it as it is.
    With ``grad_sink`` (a (G, M) buffer of the ``gradient`` criterion) the backward also adds
    ``|W * dL/dW_eff|`` to it: the only after-backward moment a method has. ``ctx`` keeps a
    reference to that module buffer (an accumulator, not a mask): saving it would trip autograd's
    version check when two forwards share one backward.
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, alive, candidates, pattern, grad_sink=None, folded=False):  # type: ignore[override]
        keep_weight = ctx.needs_input_grad[1] or grad_sink is not None
        ctx.save_for_backward(weight if keep_weight else None, mask, alive, candidates)
        ctx.grad_sink, ctx.pattern, ctx.score_dtype = grad_sink, pattern, scores.dtype
        return weight.view_as(weight) if folded or mask is None else weight * mask

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        weight, mask, alive, candidates = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1] or ctx.grad_sink is not None:
            # Eq. 9-10: dL/dB = W * dL/d(B*W), grouped (G, M); dL/dS[g, j] = sum of dL/dB[g, i] over i in candidate j.
            products = grouped_product(weight, grad_out, ctx.pattern.m)
        if ctx.needs_input_grad[1]:
            grad_scores = group_candidate_sums(products, ctx.pattern).to(ctx.score_dtype)
            if alive is not None:
                grad_scores.mul_(alive)
        if ctx.grad_sink is not None:
            ctx.grad_sink.add_(products.abs().to(ctx.grad_sink.dtype))
        grad_weight = masked_gradient(grad_out, mask) if ctx.needs_input_grad[0] else None  # last: may be in place
        return grad_weight, grad_scores, None, None, None, None, None, None


def lbc_mask(
    weight: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    alive: torch.Tensor | None,
    candidates: torch.Tensor,
    grad_sink: torch.Tensor | None = None,
    pattern: NMPattern | None = None,
    folded: bool = False,
) -> torch.Tensor:
    """Effective weight ``B * W`` whose backward sends the straight-through gradient to ``scores``
    (and adds ``|W * dL/dW_eff|`` grouped (G, M) to ``grad_sink`` when given). ``mask`` and
    ``alive`` are 0/1 tensors, bool or (faster) of the weight's and scores' float dtypes; None means
    all ones. ``folded``: the weight's pruned entries are exact zeros, the forward skips the multiply."""
    pattern = NMPattern(int(candidates[0].sum().item()), candidates.shape[1]) if pattern is None else pattern
    return _LBCMask.apply(weight, scores, mask, alive, candidates, pattern, grad_sink, folded)


_FAST_PATH_MAX_CANDIDATES = 8


def mask_from_alive(alive: torch.Tensor, pattern: NMPattern, shape: torch.Size) -> torch.Tensor:
    """Eq. 8: a weight is kept iff some alive candidate of its group contains it (bool, weight-shaped).

    The paper writes the test as ``(S * alive) @ A != 0``; we test membership, ``alive @ A > 0``,
    which is the paper's stated intent and cannot drop a weight whose alive scores sum to zero.
    For up to 16 candidates the membership is a few ORs of alive columns per position, several
    times faster on CPU than the (G, C) @ (C, M) product used beyond that.
    """
    if pattern.num_candidates > 2 * _FAST_PATH_MAX_CANDIDATES or alive.device.type != "cpu":  # few kernels
        kept = (alive.float() @ candidate_matrix(pattern, alive.device)) > 0  # 0/1 sums: exact even in TF32
    else:
        columns = alive.unbind(1)
        kept = alive.new_empty(alive.shape[0], pattern.m)
        for i, owners in enumerate(candidates_containing(pattern)):
            kept[:, i].copy_(columns[owners[0]])
            for j in owners[1:]:
                kept[:, i] |= columns[j]
    return from_groups(kept, shape)


def removal_position(values: torch.Tensor) -> torch.Tensor:
    """(G, C) int8 (int32 beyond 127 candidates): where each candidate comes when a group's values are
    sorted ascending, ties by index.

    Up to 8 candidates (2:4, 1:4, 1:8) :func:`~lbc.sparsity.nm.rank_columns` over the C columns
    (no sort: several times faster on CPU for small C; :func:`~lbc.sparsity.nm.rank_along` off the
    CPU, in a few kernels); beyond, the inverse of a stable argsort.
    Both are vectorised over the groups.
    """
    if values.shape[1] <= _FAST_PATH_MAX_CANDIDATES:
        if values.device.type != "cpu":  # a few kernels instead of ~50 small ones
            return rank_along(values, 1).to(torch.int8)
        return torch.stack(rank_columns(values.unbind(1)), 1)
    order = values.argsort(dim=1, stable=True)
    dtype = torch.int8 if values.shape[1] <= 127 else torch.int32  # int8 as rank_columns gives
    ranks = torch.arange(values.shape[1], dtype=dtype, device=values.device).expand_as(order)
    return torch.empty(order.shape, dtype=dtype, device=values.device).scatter_(1, order, ranks)


@functools.cache
def _sorted_candidate_codes(pattern: NMPattern) -> tuple[torch.Tensor, torch.Tensor]:
    """The lookup table of :func:`candidate_index`: the candidates' bit codes, sorted, and their indices."""
    codes = (candidate_matrix(pattern).long() << torch.arange(pattern.m)).sum(1)
    return codes.sort()


def group_codes(groups: torch.Tensor) -> torch.Tensor:
    """(G,) int64 bit code of each row of a (G, M) bool group mask: bit i is set iff position i is kept."""
    code = torch.zeros(groups.shape[0], dtype=torch.int64, device=groups.device)
    for i, column in enumerate(groups.unbind(1)):  # M passes over the groups, vectorised
        code |= column.long() << i
    return code


def candidate_index(groups: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """(G,) int64: the candidate (row of :func:`~lbc.sparsity.nm.candidate_matrix`) each row of a (G, M)
    bool group mask keeps, every row keeping exactly N.

    Each group's bit code is looked up in a table built from the candidate matrix (the candidates'
    codes, sorted) by a binary search vectorised over the groups: no loop over groups. M <= 62.
    """
    if pattern.m > 62:
        raise ConfigError(f"sparsity.pattern={pattern}: a group's bit code needs M <= 62 to find its candidate")
    codes, order = (t.to(groups.device) for t in _sorted_candidate_codes(pattern))
    code = group_codes(groups)
    position = torch.searchsorted(codes, code).clamp_(max=len(codes) - 1)
    if not torch.equal(codes[position], code):
        raise ValueError(f"candidate_index: a group mask does not keep exactly {pattern.n} of {pattern.m}")
    return order[position]


class LBCParametrization(MaskParametrization):
    """Per-layer LBC state: scores S (G x C), alive set (G x C) and the mask B it implies.

    With ``foldable`` (``removal=paper``, where a removed weight never comes back, no gradient
    criterion, which reads the pruned weights, and trained weights) the mask is folded into the stored weight after every
    removal (:class:`~lbc.sparsity.base.MaskParametrization`): the training forward skips ``B * W``.
    The pruned stored weights are then zero instead of decaying; nothing reads them.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        pattern: NMPattern,
        score_init: float,
        track_gradient: bool = False,
        score_dtype: torch.dtype = torch.float32,
        foldable: bool = False,
    ) -> None:
        super().__init__()
        self.foldable = self.folded = foldable  # a full mask is folded already
        self.pattern = pattern
        groups = weight.numel() // pattern.m
        candidates = candidate_matrix(pattern, weight.device)
        self.scores = nn.Parameter(torch.full((groups, pattern.num_candidates), float(score_init),
                                              dtype=score_dtype, device=weight.device))
        # ``gradient`` criterion: sum of |W * dL/dW_eff| per weight since the last removal (G, M).
        accum = torch.zeros(groups, pattern.m, device=weight.device) if track_gradient else None
        self.register_buffer("grad_accum", accum)
        self.tracking = track_gradient
        self.register_buffer("alive", torch.ones(groups, pattern.num_candidates, dtype=torch.bool,
                                                 device=weight.device))
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
        self.register_buffer("candidates", candidates, persistent=False)
        self.grad_all = False  # Eq. 9's gradient for every candidate, not only the alive ones (released, t_i == t_f)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        sink = self.grad_accum if self.tracking else None
        mask, folded = self.forward_mask(weight)
        plain = self.unrecorded(weight, folded)
        if plain is not None:
            return plain
        every = self.grad_all or mask_is_full(self, "alive")
        alive = None if every else float_view(self, "alive", self.scores.dtype)
        return lbc_mask(weight, self.scores, mask, alive, self.candidates, sink, self.pattern, folded)

    @torch.no_grad()
    def reselect(self, count: int, zero_removed: bool) -> bool:
        """``removal="released"``: alive = the top-(C - ``count``) candidates of every group by signed score.

        Exact zeros (scores removed before and not moved since) rank below everything, as the
        released code's ``alphas -= (alphas == 0) * 1000`` makes them; ties go to the lower index.
        With ``zero_removed`` the scores of the removed are set to 0 (the released code; momentum
        can move them off 0 again). Returns whether the mask changed (off the CPU: True, not compared).

        Runs before every step: the mask's cost is not looked at here (see :meth:`LBC._reselect`),
        and the removed scores are zeroed by a multiply with the cached 0/1 alive set.
        """
        values = self.scores.detach().float()  # low-precision scores: rank them exactly as stored
        keys = values.add(values.eq(0).to(values.dtype), alpha=-1000.0)
        alive = removal_position(keys) >= count
        # on CPU the comparison spares rebuilding an unchanged mask; elsewhere it would wait for the device
        changed = alive.device.type != "cpu" or not torch.equal(alive, self.alive)
        if changed:
            self.alive.copy_(alive)
            self.mask.copy_(mask_from_alive(alive, self.pattern, self.mask.shape))
        if zero_removed:  # far faster than masked_fill_ on CPU (-0.0 where a score was negative: equal to 0)
            self.scores.mul_(float_view(self, "alive", self.scores.dtype))
        return changed

    @torch.no_grad()
    def remove(self, count: int, values: torch.Tensor, weight: nn.Parameter | None = None) -> None:
        """Remove the ``count`` lowest-valued alive candidates of every group (Alg. 1, line 7).

        Ties go to the lower candidate index (:func:`removal_position`), so every process removes
        the same. ``weight``, the stored weight, is folded with the new mask when the layer is foldable.
        """
        if count <= 0:
            return
        # Never the last alive candidate of a group: a group whose alive set is smaller than the
        # schedule expects (weights restored without the method's state) keeps one.
        ranked = values.float().masked_fill(~self.alive, math.inf)
        position = removal_position(ranked)
        # counted in the positions' (small) integer type: an int64 count would widen every position to compare
        limit = (self.alive.sum(dim=1, keepdim=True, dtype=position.dtype) - 1).clamp_(min=0, max=count)
        self.alive &= position >= limit
        self.mask.copy_(mask_from_alive(self.alive, self.pattern, self.mask.shape))
        if self.foldable and weight is not None:
            self.fold(weight)
        if self.grad_accum is not None:
            self.grad_accum.zero_()  # the gradient criterion counts the steps since the last removal


@METHODS.register(options=LBCOptions)
class LBC(SparsityMethod):
    """Learning Best Combination: learnable candidate scores, gradual removal, exact N:M after t_f."""

    def __init__(self, model: nn.Module, options: LBCOptions, input_size: Sequence[int] | str | None = None) -> None:
        self.t_i, self.t_f, self.exponent = float(options.t_i), float(options.t_f), options.exponent
        self.rounding, self.update_every, self.criterion = options.rounding, options.update_every, options.criterion
        self.removal, self.freeze_scores = options.removal, options.freeze_scores
        # t_i == t_f under released removal: every score keeps learning and choosing (module docstring).
        self.reselect_all = self.removal == "released" and self.t_i == self.t_f
        # whether the learned scores stop training once one candidate is left (module docstring)
        self.freeze_when_final = self.freeze_scores and not self.reselect_all
        self.score_weight_decay, self.score_lr = options.score_weight_decay, options.score_lr
        self.prior_margin, self.train_weights = float(options.prior_margin), options.train_weights
        self.score_dtype = SCORE_DTYPES[options.score_dtype]
        pattern = parse_pattern(options.pattern)
        self.score_init = _score_init(options.score_init, pattern)
        self.removed = 0
        self._prior_given = False  # start_from gave the prior's masks (or a checkpoint restored their scores)
        self._settled = False  # released removal: the final selection is made (repeated only if scores train)
        self._cost_epoch: int | None = None  # released removal: the epoch whose step cost was last looked at
        self._frozen_scores: set[int] = set()  # ids of the scores this method turned requires_grad off for
        self._check_memory(model, pattern)
        super().__init__(model, options, input_size)
        self._freeze_if_final()  # scores of the magnitude/gradient criteria never need a gradient
        count = sum(p.numel() for p in self.score_parameters())
        weights = sum(m.weight.numel() for m in self.layers.values())
        log.info("lbc %s: %d layers, %.2fM scores (%.2f per weight), %.2f GB of %s scores", self.pattern,
                 len(self.layers), count / 1e6, count / max(1, weights), count * self.score_dtype.itemsize / 1e9,
                 options.score_dtype)
        if not self.train_weights:
            self._freeze_weights()

    # --- the method ---------------------------------------------------------------------------
    def parametrization(self, name: str, module: nn.Module) -> nn.Module:
        return LBCParametrization(module.weight, self.pattern, self.score_init, self.criterion == "gradient",
                                  self.score_dtype, foldable=self.folds_masks)

    @property
    def folds_masks(self) -> bool:
        """Whether removals fold the mask into the stored weight (:class:`LBCParametrization`): with
        ``removal=paper``, no gradient criterion and trained weights (frozen ones stay as loaded)."""
        return self.removal == "paper" and self.criterion != "gradient" and self.train_weights

    def _freeze_weights(self) -> None:
        """``train_weights=false``: every parameter of the model but the scores stops training (embeddings,
        norms, biases too), so only the mask learns; the masked layers' weight gradient is never computed
        (:class:`_LBCMask` asks ``needs_input_grad``). :meth:`detach` leaves them frozen."""
        own = {id(p) for p in self.score_parameters()}
        frozen = [p for p in self.model.parameters() if id(p) not in own]
        for param in frozen:
            param.requires_grad_(False)
        log.info("lbc: weights frozen (train_weights=false): only the scores learn, %.2fM params frozen",
                 sum(p.numel() for p in frozen) / 1e6)

    @property
    def prior(self) -> str | None:
        """``options.prior``: the one-shot criterion whose masks :meth:`start_from` is given."""
        return self.options.prior

    @torch.no_grad()
    def start_from(self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Start every group ahead with the candidate its one-shot mask keeps: add ``prior_margin`` to its score.

        The candidate is the group mask's bit code looked up in the candidates' (:func:`candidate_index`),
        vectorised over the groups. Under ``removal=paper`` with ``criterion=score`` it goes last, so
        with nothing learned the prior's mask is the final mask; under ``removal=released`` it ranks
        first (``score_inverse`` inverts the prior too: it goes first). ``weights`` (SparseGPT's
        reconstruction) are checked and ignored: LBC learns the mask of the weights as they are, as
        MaskLLM starts from SparseGPT's mask over the dense weights. Called once, after attaching and
        before the optimizer is built (the scores' optimizer state is untouched), never on resume (the
        checkpoint holds the boosted scores).
        """
        if self.prior is None:
            raise ConfigError(f"sparsity.prior=null: lbc starts from no one-shot mask; set sparsity.prior "
                              f"({', '.join(PRIORS)}) to start from one")
        if self._prior_given:
            raise RuntimeError("lbc.start_from: the prior's masks were given already (start_from is called once, "
                               "before training, never on resume)")
        self.check_start_from(masks, weights)
        for name, state in zip(self.layers, self._states(), strict=True):
            index = candidate_index(to_groups(masks[name].to(state.scores.device), self.pattern.m), self.pattern)
            state.scores.scatter_add_(1, index[:, None], state.scores.new_full((len(index), 1), self.prior_margin))
        self._prior_given = True
        log.info("lbc: %d layers start from the %s mask (its candidate's score +%g)", len(self.layers), self.prior,
                 self.prior_margin)

    def _states(self) -> list[LBCParametrization]:
        return [m.parametrizations.weight[0] for m in self.layers.values()]

    def score_parameters(self) -> list[nn.Parameter]:
        return [state.scores for state in self._states()]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The scores' group, at ``score_weight_decay`` (None: the optimizer's ``weight_decay``).

        bfloat16 scores on CPU opt out of the fused kernels: torch 2.13's fused CPU SGD leaves bfloat16
        (and float16) parameters unchanged in all but their last numel % 16 entries (the momentum moves,
        the parameter does not), silently; the unfused SGD and AdamW are right.
        """
        decay = weight_decay if self.score_weight_decay is None else self.score_weight_decay
        group: dict[str, Any] = {"params": self.score_parameters(), "weight_decay": decay}
        if self.score_lr is not None:  # timm's scheduler scales each group from its own initial lr
            group["lr"] = self.score_lr
        if self.score_dtype != torch.float32 and any(p.device.type == "cpu" for p in group["params"]):
            group["fused"] = False
        return [group]

    def candidate_values(self, state: LBCParametrization, weight: torch.Tensor) -> torch.Tensor:
        """How much each candidate (G x C) is worth keeping under ``criterion``; the lowest alive go first.

        ``weight`` is the layer's dense (stored) weight. The gradient criterion's sums are
        all-reduced across processes so every rank removes the same candidates.
        """
        if self.criterion == "score":
            return state.scores.detach()
        if self.criterion == "score_inverse":
            return -state.scores.detach()
        if self.criterion == "magnitude":
            members = to_groups(weight.detach().abs(), self.pattern.m)
        else:
            members = state.grad_accum.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(members)
        return members.to(state.candidates.dtype) @ state.candidates.T

    def target_removed(self, epoch: float) -> int:
        """Candidates removed per group by ``epoch`` (Eq. 6), per epoch or per step."""
        t = math.floor(epoch) if self.update_every == "epoch" else epoch
        return removed_total(t, self.t_i, self.t_f, self.pattern.num_candidates, self.exponent, self.rounding)

    def update(self, epoch: float) -> None:
        """Remove candidates up to the schedule's count at ``epoch`` (Eq. 6, Alg. 1 line 7).

        ``paper`` removal rebuilds masks only when the count grows; ``released`` re-selects the
        alive set by score before every step until the scores freeze (never, with ``freeze_scores=False``).
        """
        self.check_attached()
        if not self._prior_given and self.prior is not None:
            raise ConfigError(f"sparsity.prior={self.prior}: lbc was never given the one-shot masks (start_from); "
                              "only a task that calibrates them (the language-model task) can start from a prior, "
                              "elsewhere use sparsity.prior=null")
        self.epoch = float(epoch)
        target = self.target_removed(epoch)
        if self.removal == "released":
            self._reselect(target)
            return
        if target <= self.removed:
            return
        for module in self.layers.values():
            state, weight = module.parametrizations.weight[0], module.parametrizations.weight.original
            state.remove(target - self.removed, self.candidate_values(state, weight), weight)
        self.removed = target
        self._freeze_if_final()
        self._record_cost()

    def _reselect(self, target: int) -> None:
        """``removal="released"``: re-choose every layer's alive set by score at count ``target``."""
        final = target >= self.pattern.num_candidates - 1
        if self._settled and final and self.freeze_when_final:
            return  # frozen scores choose the same candidates at every step
        changed = False
        for state in self._states():
            state.grad_all = self.reselect_all
            changed |= state.reselect(target, zero_removed=not self.reselect_all)
        grew = target != self.removed
        self.removed = target
        self._settled = final
        if grew:
            self._freeze_if_final()
        # the masks can change at every step: their cost is looked at once per epoch (a step's cost is a
        # pass over every mask), and recorded when it moved
        epoch = math.floor(self.epoch)
        if grew or changed and epoch != self._cost_epoch and self._cost_moved():
            self._record_cost()
        if grew or changed:
            self._cost_epoch = epoch

    def _cost_moved(self, tolerance: float = 1e-3) -> bool:
        """Whether the step cost moved by more than ``tolerance`` since the last recorded entry.

        Released re-selection can change masks at every step; recording each would grow the
        FLOPs timeline (kept in checkpoints) by one entry per step for a change in the 4th digit.
        """
        timeline = self.flops.timeline
        return not timeline or abs(self.step_cost() - timeline[-1][1]) > tolerance

    def _freeze_if_final(self) -> None:
        # One candidate left (t_f): with freeze_scores the scores stop training, as the mask can no
        # longer change (paper removal) or frozen scores choose the same (released), so score work is
        # waste. Magnitude and gradient criteria never learn the scores.
        # Only scores this method froze are ever unfrozen: scores someone else froze (mmdet's
        # frozen_stages turns off every parameter of a stage) stay as they were left.
        at_end = self.removed >= self.pattern.num_candidates - 1
        learning = self.criterion in LEARNED_CRITERIA and not (at_end and self.freeze_when_final)
        froze = False
        for scores in self.score_parameters():
            if learning:
                if id(scores) in self._frozen_scores:
                    scores.requires_grad_(True)
                    self._frozen_scores.discard(id(scores))
            else:
                if scores.requires_grad:
                    scores.requires_grad_(False)
                    self._frozen_scores.add(id(scores))
                    froze = True
                scores.grad = None
        for state in self._states():
            state.tracking = state.grad_accum is not None and not at_end  # no removal is left to choose
        if froze and at_end and not self.train_weights:
            log.warning("lbc: one candidate left in every group and the weights frozen (train_weights=false): "
                        "nothing trains from epoch %g on (t_f=%g); stop training there", self.epoch, self.t_f)

    def finalize(self) -> None:
        """Raise if the schedule has run out (one candidate per group) but the model is not N:M."""
        if self.target_removed(self.epoch) >= self.pattern.num_candidates - 1:
            if not self.is_exact_nm():
                raise RuntimeError(f"lbc: the schedule ended at t_f={self.t_f} but the model is not exactly {self.pattern}")
        else:
            log.warning("lbc: training ended at epoch %.2f, before the schedule's end (t_f=%g, per %s): "
                        "the model is not N:M yet", self.epoch, self.t_f, self.update_every)

    # --- bookkeeping --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "removed": self.removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.removed = int(state["removed"])
        self._prior_given = True  # a resumed run's scores hold the prior's margin already
        self._settled = False  # released removal: re-select once from the restored scores
        self._freeze_if_final()

    @classmethod
    def carried_state(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """``removed``: the source's place on Eq. 6 (after t_f nothing is removed again)."""
        return {k: state[k] for k in ("removed",) if k in state}

    def extra_scalars(self) -> dict[str, float]:
        states = self._states()
        groups = sum(s.alive.shape[0] for s in states)
        alive = sum(int(s.alive.sum()) for s in states)
        return {"alive_per_group": alive / max(1, groups), "removed_per_group": float(self.removed)}

    def extra_layer_figures(self, name: str) -> dict[str, Any]:
        state = self.layers[name].parametrizations.weight[0]
        return {"alive_per_group": float(state.alive.sum()) / state.alive.shape[0]}

    def _check_memory(self, model: nn.Module, pattern: NMPattern) -> None:
        """Refuse, with one line, a pattern whose scores (plus gradient and optimizer state) cannot fit."""
        params = list(model.parameters())
        if not params:
            return
        device = params[0].device
        weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        need = weights / pattern.m * pattern.num_candidates * self.score_dtype.itemsize * 4  # + grads, 2 optim slots
        free = _free_memory(device)
        if free is not None and need > free:
            raise ConfigError(
                f"sparsity.pattern={pattern}: LBC needs {pattern.num_candidates / pattern.m:.2f} "
                f"{str(self.score_dtype).removeprefix('torch.')} scores per weight, "
                f"about {need / 2**30:.1f} GiB with gradients and optimizer state, but only "
                f"{free / 2**30:.1f} GiB is free on {device}; choose a smaller M"
                f"{', sparsity.score_dtype=bfloat16' if self.score_dtype.itemsize > 2 else ''} or fewer layers"
            )


def _score_init(value: float | str, pattern: NMPattern) -> float:
    """Every score's start (``LBCOptions.score_init``, checked): paper 1, released 1/C(M-1, N-1), or the number."""
    if value == "paper":
        return 1.0
    if value == "released":
        return 1.0 / math.comb(pattern.m - 1, pattern.n - 1)
    return float(value)


def _free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None: unknown, do not refuse)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:  # MemAvailable counts reclaimable page cache; "free" pages alone would refuse too early
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

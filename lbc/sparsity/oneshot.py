"""One-shot N:M pruning: magnitude, Wanda and SparseGPT masks, and the fixed-mask methods that start from them.

The math is three pure functions of a Linear layer's weight ``(out, in)`` and, for the two
calibrated criteria, statistics of its inputs over calibration tokens (collected block by block by
:func:`lbc.lm.calibrate.one_shot`):

- :func:`magnitude_mask`: keep the N largest ``|W_ij|`` of every group (= ASP's prune);
- :func:`wanda_mask` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): keep the
  N largest ``|W_ij| * ||X_j||_2`` of every group, ``||X_j||`` the norm of input feature j;
- :func:`sparsegpt_prune` (Frantar & Alistarh 2023, "SparseGPT"): choose each group's mask by the
  OBS saliency ``w^2 / [H^-1]_jj`` and update the remaining weights of the row to compensate,
  column by column, as the authors' reference algorithm does.

The methods ``magnitude``, ``wanda`` and ``sparsegpt`` keep a fixed bool mask per layer (ASP's
parametrisation: forward ``mask * W``, masked weight gradient). The masks are all ones until
:meth:`OneShot.start_from` sets them (and, for SparseGPT, the reconstructed weights); then the
model fine-tunes (or is evaluated) with the mask fixed, the stored pruned weights kept at zero on
every :meth:`~OneShot.update`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, is_number, require
from lbc.sparsity.asp import ASPParametrization
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, parse_pattern, topn_mask
from lbc.sparsity.options import SparsityOptions
from lbc.sparsity.registry import METHODS

log = logging.getLogger(__name__)

__all__ = ["Magnitude", "MagnitudeOptions", "OneShot", "SparseGPT", "SparseGPTOptions", "Wanda", "WandaOptions",
           "magnitude_mask", "sparsegpt_prune", "wanda_mask"]


# --- the criteria: pure tensor functions ------------------------------------------------------
def magnitude_mask(weight: torch.Tensor, pattern: NMPattern | str) -> torch.Tensor:
    """Bool mask keeping the N largest ``|w|`` of every group of M inputs (ties: the lower index)."""
    return topn_mask(weight, parse_pattern(pattern))


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, pattern: NMPattern | str) -> torch.Tensor:
    """Wanda's N:M mask of a Linear weight ``(out, in)``: keep the N largest ``|W_ij| * ||X_j||_2`` per group.

    ``input_norm`` (``in``,) is the L2 norm of each input feature over all calibration tokens (any
    common scale gives the same mask). Groups are M consecutive input features of one row; ties keep
    the lower index, as :func:`~lbc.sparsity.nm.topn_mask`.
    """
    score = weight.detach().float().abs() * input_norm.detach().float().reshape(1, -1)
    return topn_mask(score, parse_pattern(pattern))


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: NMPattern | str,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT with the N:M constraint: ``(new_weight, mask)`` of a Linear weight ``(out, in)``.

    ``hessian`` is ``H = X^T X`` (``in`` x ``in``) summed over the calibration tokens; the reference
    code's ``2 / n_samples`` scale is left out because it cancels (the dampening is relative to
    ``mean(diag H)``, and the masks and updates depend on H only up to scale). As in the authors'
    reference: dead inputs (``H_jj == 0``) get ``H_jj = 1`` and weight 0; ``damp * mean(diag H)`` is
    added to the diagonal; ``U`` is the upper Cholesky factor of ``H^-1``. Column blocks of
    ``blocksize`` are processed left to right; at every column ``i`` with ``i % M == 0`` each row keeps
    the N largest ``w^2 / U_jj^2`` of columns ``i..i+M-1`` (the weights as updated so far; ties: the
    lower index); every column's pruning error is then spread over the block's later columns (the
    OBS update), and the block's errors over the later blocks at once (the lazy batch update).
    Computes in float32 (float64 for float64 input); returns the input's dtype, pruned entries 0.
    """
    pattern = parse_pattern(pattern)
    require(isinstance(blocksize, int) and blocksize >= pattern.m and blocksize % pattern.m == 0,
            "sparsity.blocksize", blocksize, f"use a multiple of M={pattern.m} (a group must not straddle two blocks)")
    rows, columns = weight.shape
    if columns % pattern.m or hessian.shape != (columns, columns):
        raise ValueError(f"sparsegpt_prune: weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} "
                         f"do not fit {pattern} (need in % M == 0 and an in x in hessian)")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info != 0:
        raise ConfigError(f"sparsity.damp={damp}: SparseGPT's dampened Hessian is not positive definite "
                          "(too few calibration tokens for this layer?); raise sparsity.damp")
    Hinv = L  # the upper Cholesky factor U of H^-1: row j of U is the OBS update of column j
    keep = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        keep1 = keep[:, i1:i2]
        for i in range(i2 - i1):
            if i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                keep1[:, group] = topn_mask(W1[:, group] ** 2 / d[group] ** 2, pattern)
            w = W1[:, i]
            q = torch.where(keep1[:, i], w, 0.0)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.masked_fill_(~keep, 0.0).to(weight.dtype), keep


# --- the methods ------------------------------------------------------------------------------
@dataclass
class MagnitudeOptions(SparsityOptions):
    """One-shot magnitude pruning to N:M (no calibration data), then the mask stays fixed."""

    method: str = "magnitude"


@dataclass
class WandaOptions(SparsityOptions):
    """One-shot Wanda pruning to N:M (|W| times input-feature norms on calibration data), then a fixed mask."""

    method: str = "wanda"


@dataclass
class SparseGPTOptions(SparsityOptions):
    """One-shot SparseGPT to N:M (OBS masks and weight reconstruction on calibration data), then a fixed mask."""

    method: str = "sparsegpt"
    damp: float = 0.01  # dampening of the Hessian's diagonal, relative to its mean
    blocksize: int = 128  # columns per lazy-update block: a multiple of M

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.damp) and 0 < self.damp < 1,
                "sparsity.damp", self.damp, "use a number in (0, 1), e.g. 0.01")
        m = parse_pattern(self.pattern).m
        require(isinstance(self.blocksize, int) and not isinstance(self.blocksize, bool)
                and self.blocksize >= m and self.blocksize % m == 0, "sparsity.blocksize", self.blocksize,
                f"use a multiple of M={m} (e.g. 128)")


class OneShot(SparsityMethod):
    """A fixed N:M mask per layer, all ones until :meth:`start_from` sets the one-shot criterion's masks.

    ``state_dict`` records ``pruned`` (whether the masks were set; the masks themselves are buffers
    in the model's state dict). The criterion is the method's own name (:attr:`prior`).
    """

    def __init__(self, model: nn.Module, options: SparsityOptions,
                 input_size: Sequence[int] | str | None = None) -> None:
        self.pruned = False
        super().__init__(model, options, input_size)

    @property
    def prior(self) -> str | None:
        """The one-shot criterion whose masks this method starts from: its own name."""
        return self.name

    def parametrization(self, name: str, module: nn.Module) -> nn.Module | None:
        return ASPParametrization(module.weight)

    def _states(self) -> dict[str, tuple[nn.Parameter, ASPParametrization]]:
        return {n: (m.parametrizations.weight.original, m.parametrizations.weight[0]) for n, m in self.layers.items()}

    @torch.no_grad()
    def start_from(self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Set every layer's mask (bool, weight-shaped, exactly N:M) and, if given, its new stored weight.

        Called once, after attaching and before training, never on resume (the checkpoint holds the
        masks and ``pruned``); what it is given is checked by :meth:`check_start_from`.
        """
        self.check_start_from(masks, weights)
        states = self._states()
        for name, (weight, state) in states.items():
            if weights is not None:
                weight.copy_(weights[name])
            state.set_mask(masks[name].to(torch.bool), weight)
        self.pruned = True
        self._record_cost()
        log.info("%s: %d layers start from %s masks%s", self.name, len(states), self.pattern,
                 " and reconstructed weights" if weights is not None else "")

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        for weight, state in self._states().values():
            state.keep_zeros(weight)  # nothing to do while folded: the zeros stay in place

    def update(self, epoch: float) -> None:
        """Advance the clock; once the masks are set, keep the stored pruned weights at 0 (as ASP does)."""
        self.check_attached()
        self.epoch = float(epoch)
        if self.pruned:
            self._zero_pruned()

    def finalize(self) -> None:
        """Zero the stored pruned weights once more; raise unless every mask is exactly N:M."""
        if not self.pruned or not self.is_exact_nm():
            raise RuntimeError(f"{self.name}: the masks are not exactly {self.pattern}: start_from(masks) was "
                               "never called (the one-shot masks were not computed)")
        self._zero_pruned()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned = bool(state["pruned"])

    @classmethod
    def carried_state(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """``pruned``: carried masks are the one-shot masks (a fresh target must not wait for start_from)."""
        return {k: state[k] for k in ("pruned",) if k in state}


@METHODS.register(options=MagnitudeOptions)
class Magnitude(OneShot):
    """Fixed N:M mask from one-shot magnitude pruning (:func:`magnitude_mask`)."""


@METHODS.register(options=WandaOptions)
class Wanda(OneShot):
    """Fixed N:M mask from one-shot Wanda pruning (:func:`wanda_mask`)."""


@METHODS.register(options=SparseGPTOptions)
class SparseGPT(OneShot):
    """Fixed N:M mask and reconstructed weights from one-shot SparseGPT (:func:`sparsegpt_prune`)."""

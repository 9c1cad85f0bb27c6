"""SR-STE, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch" (Zhou et al., 2021).

The LBC paper's main baseline (its ref. [40], Sec. 2.2 and Table 1). Every forward keeps the
top-N magnitudes of each group (the mask is recomputed each step); the backward is dense,
straight through the mask, plus the sparse-refined decay of the pruned weights:
``dL/dW = dL/dW_eff + lambda_w * (1 - mask) * W``.

Data parallel: the decay term is added by the same autograd function on every rank *before*
DDP averages gradients. ``W`` and the mask are identical on every rank, so the average of the
identical terms is the term itself: ``lambda_w`` means the same for any number of processes
(the reference code sums instead of averaging, which scales it with the GPU count).

Gradual schedule (``t_i``/``t_f``, the LBC paper's Table 5: "we also apply the same gradual
sparsity schedule to SR-STE"): our reading is that the number of weights *kept* per group goes
from M down to N on Eq. 6's cubic curve, i.e. ``M - ceil((M - N) * (1 - (1 - x)^3))`` with
``x = (t - t_i) / (t_f - t_i)`` (M before ``t_i``, N from ``t_f`` on), updated once per epoch as
LBC's count is. The mask keeps that many of the largest ``|w|``; the sparse-refined term decays
the others. Training FLOPs follow the density it used. Without ``t_i``/``t_f`` (the default) the
mask is N:M from the first step, as in the SR-STE paper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lbc.errors import is_number, require
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, topn_mask
from lbc.sparsity.options import SparsityOptions
from lbc.sparsity.registry import METHODS
from lbc.sparsity.schedule import removed_total

log = logging.getLogger(__name__)

@dataclass
class SRSTEOptions(SparsityOptions):
    """SR-STE: top-N magnitude mask every forward, dense gradient plus ``lambda_w * (1 - mask) * W``."""

    method: str = "srste"
    lambda_w: float = 2e-4  # the sparse-refined decay (SR-STE paper: 2e-4)
    t_i: float | None = None  # gradual schedule (LBC Table 5): kept per group from M to N on Eq. 6 ...
    t_f: float | None = None  # ... between t_i and t_f; both null: N:M from the first step (SR-STE paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        require((self.t_i is None) == (self.t_f is None), "sparsity.t_f", self.t_f,
                f"give both sparsity.t_i and sparsity.t_f for SR-STE's gradual schedule, or neither (t_i={self.t_i})")
        if self.t_i is not None:
            require(is_number(self.t_i) and self.t_i >= 0, "sparsity.t_i", self.t_i, "use a number >= 0")
            require(is_number(self.t_f) and self.t_f >= self.t_i, "sparsity.t_f", self.t_f,
                    f"use a number >= sparsity.t_i={self.t_i}")
        require(is_number(self.lambda_w) and self.lambda_w >= 0, "sparsity.lambda_w", self.lambda_w,
                "use a number >= 0 (paper: 2e-4)")


class _SRSTEMask(torch.autograd.Function):
    """Forward: top-N mask and ``mask * W``; backward: dense gradient + ``lambda_w * (1 - mask) * W``."""

    @staticmethod
    def forward(ctx, weight, n, m, lambda_w):  # type: ignore[override]
        mask = topn_mask(weight, NMPattern(n, m)) if n < m else torch.ones_like(weight, dtype=torch.bool)
        pruned = (~mask).to(weight.dtype)  # float multiplies are far faster than torch.where on CPU
        ctx.lambda_w = lambda_w
        ctx.save_for_backward(weight, pruned)
        ctx.mark_non_differentiable(mask)
        ctx.set_materialize_grads(False)  # no zeros made for the mask's (absent) gradient
        return torch.addcmul(weight, weight, pruned, value=-1.0), mask  # W - W * pruned in one pass

    @staticmethod
    def backward(ctx, grad_out, grad_mask):  # type: ignore[override]
        weight, pruned = ctx.saved_tensors
        if grad_out is None:  # nothing used the masked weight
            return None, None, None, None
        grad_weight = torch.addcmul(grad_out, weight, pruned, value=ctx.lambda_w)
        return grad_weight, None, None, None


def srste_mask(
    weight: torch.Tensor, pattern: NMPattern, lambda_w: float, kept: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask * W, mask)`` with the SR-STE backward; ``mask`` keeps the top-``kept`` (default N) ``|w|`` per group."""
    return _SRSTEMask.apply(weight, pattern.n if kept is None else kept, pattern.m, float(lambda_w))


class SRSTEParametrization(nn.Module):
    """Per-layer SR-STE state: the mask of the last training-mode forward (a bool buffer).

    Every forward uses the top-N mask of the current weight; only training-mode forwards write it
    to the buffer, so ``masks()``/``report()`` show the mask the last optimizer step used and
    evaluation (or an EMA copy in eval mode) has no side effects on the buffer.
    """

    def __init__(self, weight: torch.Tensor, pattern: NMPattern, lambda_w: float, kept: int | None = None) -> None:
        super().__init__()
        self.pattern, self.lambda_w = pattern, lambda_w
        self.kept = pattern.n if kept is None else kept  # weights kept per group now (gradual schedule: M .. N)
        self.register_buffer("mask", self.top_mask(weight))

    def top_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The largest ``kept`` magnitudes of every group of ``weight`` (all of them while ``kept == M``)."""
        if self.kept >= self.pattern.m:
            return torch.ones_like(weight, dtype=torch.bool)
        return topn_mask(weight, NMPattern(self.kept, self.pattern.m))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out, mask = srste_mask(weight, self.pattern, self.lambda_w, self.kept)
        if self.training:
            with torch.no_grad():
                self.mask.copy_(mask)
        return out


@METHODS.register(options=SRSTEOptions)
class SRSTE(SparsityMethod):
    """Sparse-refined straight-through estimator: exact N:M in every forward, dense backward."""

    def __init__(
        self, model: nn.Module, options: SRSTEOptions, input_size: Sequence[int] | str | None = None
    ) -> None:
        self.lambda_w = float(options.lambda_w)
        self.gradual = options.t_i is not None
        self.t_i, self.t_f = (float(options.t_i), float(options.t_f)) if self.gradual else (None, None)
        self.kept: int | None = None
        super().__init__(model, options, input_size)
        if self.gradual:
            self.update(0.0)

    def parametrization(self, name: str, module: nn.Module) -> nn.Module:
        kept = self.kept_per_group(0.0) if self.gradual else None
        return SRSTEParametrization(module.weight, self.pattern, self.lambda_w, kept)

    def kept_per_group(self, epoch: float) -> int:
        """Weights kept per group at ``epoch``: M down to N on Eq. 6's cubic (whole epochs; module docstring)."""
        if not self.gradual:
            return self.pattern.n
        m, n = self.pattern.m, self.pattern.n
        return m - removed_total(math.floor(epoch), self.t_i, self.t_f, m - n + 1)

    def update(self, epoch: float) -> None:
        """Gradual schedule only: change the kept count when Eq. 6 says so, and note the new step cost."""
        super().update(epoch)
        if not self.gradual:
            return
        kept = self.kept_per_group(epoch)
        if kept == self.kept:
            return
        self.kept = kept
        for module in self.layers.values():
            state = module.parametrizations.weight[0]
            state.kept = kept
            with torch.no_grad():
                state.mask.copy_(state.top_mask(module.parametrizations.weight.original))
        self._record_cost()

    def extra_scalars(self) -> dict[str, float]:
        return {"kept_per_group": float(self.kept)} if self.gradual else {}

    @classmethod
    def carried_mask(cls, weight: torch.Tensor, mask: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
        """The top-N of the weight: SR-STE's forward uses the current weight's, not the last step's buffer."""
        return topn_mask(weight, pattern)

    def unit_cost(self, density: float) -> float:
        """Sparse forward (``density``) and dense backward (2 units): (d + 2) / 3, paper Table 1's 0.83x for 2:4."""
        return (density + 2.0) / 3.0

    def finalize(self) -> None:
        """Raise if the (gradual) schedule has ended but the model is not N:M; warn, as LBC does, when training
        ended before the gradual schedule's end (t_f beyond the epochs: the model is not N:M yet)."""
        if self.gradual and self.kept_per_group(self.epoch) > self.pattern.n:
            log.warning("srste: training ended at epoch %.2f, before the schedule's end (t_f=%g): the model is "
                        "not N:M yet", self.epoch, self.t_f)
            return
        if not self.is_exact_nm():
            raise RuntimeError(f"srste: the model is not exactly {self.pattern}")

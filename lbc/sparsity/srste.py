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

import math
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, topn_mask
from lbc.sparsity.registry import METHODS
from lbc.sparsity.schedule import removed_total


class _SRSTEMask(torch.autograd.Function):
    """Forward: top-N mask and ``mask * W``; backward: dense gradient + ``lambda_w * (1 - mask) * W``."""

    @staticmethod
    def forward(ctx, weight, n, m, lambda_w):  # type: ignore[override]
        mask = topn_mask(weight, NMPattern(n, m)) if n < m else torch.ones_like(weight, dtype=torch.bool)
        pruned = (~mask).to(weight.dtype)  # float multiplies are far faster than torch.where on CPU
        ctx.lambda_w = lambda_w
        ctx.save_for_backward(weight, pruned)
        ctx.mark_non_differentiable(mask)
        return weight - weight * pruned, mask

    @staticmethod
    def backward(ctx, grad_out, grad_mask):  # type: ignore[override]
        weight, pruned = ctx.saved_tensors
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


@METHODS.register("srste")
class SRSTE(SparsityMethod):
    """Sparse-refined straight-through estimator: exact N:M in every forward, dense backward."""

    name = "srste"

    def __init__(
        self,
        model: nn.Module,
        pattern: str | NMPattern = "2:4",
        lambda_w: float = 2e-4,
        t_i: float | None = None,
        t_f: float | None = None,
        **common: Any,
    ) -> None:
        if not isinstance(lambda_w, (int, float)) or isinstance(lambda_w, bool) or lambda_w < 0:
            raise ConfigError(f"sparsity.lambda_w={lambda_w!r}; need a non-negative number (paper: 2e-4)")
        if (t_i is None) != (t_f is None) or t_i is not None and not 0 <= t_i <= t_f:
            raise ConfigError(f"sparsity.t_i={t_i}, sparsity.t_f={t_f}: give both, with 0 <= t_i <= t_f, or neither")
        self.lambda_w = float(lambda_w)
        self.t_i, self.t_f = (None, None) if t_i is None else (float(t_i), float(t_f))
        self.gradual = t_i is not None
        self.kept: int | None = None
        super().__init__(model, pattern, **common)
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

    def unit_cost(self, density: float) -> float:
        """Sparse forward (``density``) and dense backward (2 units): (d + 2) / 3, paper Table 1's 0.83x for 2:4."""
        return (density + 2.0) / 3.0

    def finalize(self) -> None:
        if not self.is_exact_nm():
            raise RuntimeError(f"srste: the model is not exactly {self.pattern}")

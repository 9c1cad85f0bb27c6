"""SR-STE, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch" (Zhou et al., 2021).

The LBC paper's main baseline (its ref. [40], Sec. 2.2 and Table 1). Every forward keeps the
top-N magnitudes of each group (the mask is recomputed each step); the backward is dense,
straight through the mask, plus the sparse-refined decay of the pruned weights:
``dL/dW = dL/dW_eff + lambda_w * (1 - mask) * W``.

Data parallel: the decay term is added by the same autograd function on every rank *before*
DDP averages gradients. ``W`` and the mask are identical on every rank, so the average of the
identical terms is the term itself: ``lambda_w`` means the same for any number of processes
(the reference code sums instead of averaging, which scales it with the GPU count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, topn_mask
from lbc.sparsity.registry import METHODS


class _SRSTEMask(torch.autograd.Function):
    """Forward: top-N mask and ``mask * W``; backward: dense gradient + ``lambda_w * (1 - mask) * W``."""

    @staticmethod
    def forward(ctx, weight, n, m, lambda_w):  # type: ignore[override]
        mask = topn_mask(weight, NMPattern(n, m))
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


def srste_mask(weight: torch.Tensor, pattern: NMPattern, lambda_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask * W, mask)`` with the SR-STE backward; ``mask`` is the top-N magnitude mask of ``W``."""
    return _SRSTEMask.apply(weight, pattern.n, pattern.m, float(lambda_w))


class SRSTEParametrization(nn.Module):
    """Per-layer SR-STE state: the mask of the last training-mode forward (a bool buffer).

    Every forward uses the top-N mask of the current weight; only training-mode forwards write it
    to the buffer, so ``masks()``/``report()`` show the mask the last optimizer step used and
    evaluation (or an EMA copy in eval mode) has no side effects on the buffer.
    """

    def __init__(self, weight: torch.Tensor, pattern: NMPattern, lambda_w: float) -> None:
        super().__init__()
        self.pattern, self.lambda_w = pattern, lambda_w
        self.register_buffer("mask", topn_mask(weight, pattern))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out, mask = srste_mask(weight, self.pattern, self.lambda_w)
        if self.training:
            with torch.no_grad():
                self.mask.copy_(mask)
        return out


@METHODS.register("srste")
class SRSTE(SparsityMethod):
    """Sparse-refined straight-through estimator: exact N:M in every forward, dense backward."""

    name = "srste"

    def __init__(
        self, model: nn.Module, pattern: str | NMPattern = "2:4", lambda_w: float = 2e-4, **common: Any
    ) -> None:
        if not isinstance(lambda_w, (int, float)) or isinstance(lambda_w, bool) or lambda_w < 0:
            raise ConfigError(f"sparsity.lambda_w={lambda_w!r}; need a non-negative number (paper: 2e-4)")
        self.lambda_w = float(lambda_w)
        super().__init__(model, pattern, **common)

    def parametrization(self, name: str, module: nn.Module) -> nn.Module:
        return SRSTEParametrization(module.weight, self.pattern, self.lambda_w)

    def unit_cost(self, density: float) -> float:
        """Sparse forward (``density``) and dense backward (2 units): (d + 2) / 3, paper Table 1's 0.83x for 2:4."""
        return (density + 2.0) / 3.0

    def finalize(self) -> None:
        if not self.is_exact_nm():
            raise RuntimeError(f"srste: the model is not exactly {self.pattern}")

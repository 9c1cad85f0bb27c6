"""SR-STE, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch" (Zhou et al., 2021).

Every forward keeps the top-N magnitudes of each group (the mask is recomputed each step); the
backward is dense, straight through the mask, plus the sparse-refined decay of the pruned weights:
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
from lbc.sparsity.nm import NMPattern, from_groups, to_groups
from lbc.sparsity.registry import METHODS


def topn_mask(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Bool mask, weight-shaped, keeping the N largest ``|w|`` of every group; ties keep the lower index.

    For M <= 8 a weight is kept when fewer than N of its group rank ahead of it: M(M-1)/2
    comparisons over strided views of the weight, vectorised over all groups and without the
    copies to (G, M), several times faster than ``topk`` on CPU. Larger M uses ``topk`` over (G, M).
    """
    magnitude = weight.detach().abs()
    if pattern.m > 8:
        groups = to_groups(magnitude, pattern.m)
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
        keep.scatter_(1, groups.topk(pattern.n, dim=1).indices, True)
        return from_groups(keep, weight.shape)
    columns = magnitude.unflatten(1, (weight.shape[1] // pattern.m, pattern.m)).unbind(2)
    # ahead[i] = how many of the group rank before weight i (larger, or equal at a lower index).
    # Each pair is compared once: j > i is ahead of i iff |w_j| > |w_i|, else i is ahead of j.
    ahead = [torch.full(columns[0].shape, i, dtype=torch.int8, device=weight.device) for i in range(pattern.m)]
    for i in range(pattern.m):
        for j in range(i + 1, pattern.m):
            later_wins = (columns[j] > columns[i]).view(torch.int8)
            ahead[i] += later_wins
            ahead[j] -= later_wins
    kept = [rank < pattern.n for rank in ahead]
    return torch.stack(kept, 2).flatten(1, 2)


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
        """Sparse forward (``density``) and dense backward (2 units): (d + 2) / 3, 0.83 for 2:4."""
        return (density + 2.0) / 3.0

    def finalize(self) -> None:
        if not self.is_exact_nm():
            raise RuntimeError(f"srste: the model is not exactly {self.pattern}")

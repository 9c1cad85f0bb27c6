"""The dense reference: selects the layers the other methods would sparsify, masks nothing."""

from __future__ import annotations

from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.registry import METHODS


@METHODS.register("dense")
class Dense(SparsityMethod):
    """No-op method: every figure is the dense model's (density 1, training FLOPs 1x)."""

    name = "dense"

"""The dense reference: selects the layers the other methods would sparsify, masks nothing."""

from __future__ import annotations

from dataclasses import dataclass

from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.options import SparsityOptions
from lbc.sparsity.registry import METHODS


@dataclass
class DenseOptions(SparsityOptions):
    """The dense reference row: nothing is masked."""

    method: str = "dense"


@METHODS.register(options=DenseOptions)
class Dense(SparsityMethod):
    """No-op method: every figure is the dense model's (density 1, training FLOPs 1x)."""

    masks_weights = False

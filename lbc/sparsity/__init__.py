"""N:M sparsity: the core (patterns, grouping, attach) and one small file per method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity import asp, dense, lbc, oneshot, srste  # noqa: F401  (registers the methods)
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, parse_pattern
from lbc.sparsity.options import SparsityOptions, check_options
from lbc.sparsity.registry import METHODS
from lbc.sparsity.selection import LayerSelection, select_layers

__all__ = ["METHODS", "LayerSelection", "NMPattern", "SparsityMethod", "SparsityOptions", "parse_pattern",
           "select_layers", "sparsify"]


def sparsify(
    model: nn.Module, method: str = "lbc", *, input_size: Sequence[int] | str | None = None, **options: Any
) -> SparsityMethod:
    """Attach sparsity ``method`` to ``model`` in place and return the method object.

    ``options`` are the method's keywords (``pattern``, ``exclude``, ``t_i``, ``t_f``, ...), checked
    against its options dataclass (``METHODS.get(method).Options``, the schema the config uses): an
    unknown key or a bad value is a one-line ConfigError naming ``sparsity.<key>``. ``input_size``
    weights the training-FLOPs figures by each layer's MACs: (C, H, W) counts them now on a made-up
    input, ``"first_forward"`` measures them on the model's first real forward (for models that
    cannot take a plain tensor, such as detectors), None weights layers by their weight counts.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"lbc.sparsify: model must be a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(method, str):
        raise ConfigError(f"sparsity.method={method!r} is not allowed; use a method name ({', '.join(METHODS.names())})")
    cls = METHODS.get(method, key="sparsity.method")
    return cls(model, check_options(cls.Options, method, options), input_size=input_size)

"""N:M sparsity: the core (patterns, grouping, attach) and one small file per method."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity import asp, dense, lbc, srste  # noqa: F401  (registers the methods)
from lbc.sparsity.base import SparsityMethod
from lbc.sparsity.nm import NMPattern, parse_pattern
from lbc.sparsity.registry import METHODS
from lbc.sparsity.selection import LayerSelection, select_layers

__all__ = ["METHODS", "LayerSelection", "NMPattern", "SparsityMethod", "parse_pattern", "select_layers", "sparsify"]


def sparsify(model: nn.Module, method: str = "lbc", **options: Any) -> SparsityMethod:
    """Attach sparsity ``method`` to ``model`` in place and return the method object.

    ``options`` are the method's keywords (``pattern``, ``exclude``, ``t_i``, ``t_f``, ...); an
    unknown one is a one-line ConfigError naming ``sparsity.<key>`` and the allowed keys.
    """
    cls = METHODS.get(method, key="sparsity.method")
    allowed = _keywords(cls)
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"sparsity.{key} is not an option of method {method!r}; allowed: {', '.join(sorted(allowed))}"
            )
    return cls(model, **options)


def _keywords(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            names |= {p for p in params if p not in ("self", "model", "args", "kwargs")}
    return names

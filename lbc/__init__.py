"""lbc: N:M fine-grained sparse training (LBC, SR-STE, ASP, dense) on any ``nn.Module``.

>>> import lbc
>>> sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=60)
>>> lbc.accelerate(exported_model, dtype=torch.float16)  # 2:4 weights on sparse tensor cores (CUDA, sm80+)

The names below (and the submodules, ``lbc.sparsity.nm`` after ``import lbc``) are imported on first
use (PEP 562): ``import lbc`` alone, as every ``lbc.*`` import and console script does, loads no torch,
so ``lbc-train --help`` prints at once.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lbc.accelerate import accelerate
    from lbc.engine.optim import param_groups
    from lbc.sparsity import METHODS, NMPattern, SparsityMethod, parse_pattern, sparsify

__version__ = "0.1.0"
__all__ = ["METHODS", "accelerate", "NMPattern", "SparsityMethod", "param_groups", "parse_pattern", "sparsify", "__version__"]

_LAZY = {"accelerate": "lbc.accelerate", "param_groups": "lbc.engine.optim", "METHODS": "lbc.sparsity",
         "NMPattern": "lbc.sparsity", "SparsityMethod": "lbc.sparsity", "parse_pattern": "lbc.sparsity",
         "sparsify": "lbc.sparsity"}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; else a submodule (``lbc.engine``), imported."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``lbc.accelerate`` is the function, though a submodule of that name exists: the import system binds
    a submodule on its package once loaded (``from lbc.accelerate import x``); that binding is skipped."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "accelerate" and isinstance(value, types.ModuleType):
            return  # __getattr__ returns the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""Weights-only loading of mmengine / mmdet checkpoints: exactly the globals they need, allowed by name.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine's ``load_checkpoint`` / ``Runner.resume``
call ``torch.load`` without the argument, so a Runner checkpoint fails to load unless its few non-tensor globals
are allowed. A checkpoint of our runs (Runner + SparseDetector + SparsityHook) holds, besides tensors, numbers,
strings and plain containers:

- the message hub's ``mmengine.logging.HistoryBuffer`` objects, whose ``__getstate__`` stores the class's
  statistics methods as ``getattr(HistoryBuffer, 'min' | 'max' | 'current' | 'mean')`` and whose histories are
  numpy arrays (float64 values, int64 counts);
- a numpy float64 scalar (the message hub's ``eta``).

Allowing ``builtins.getattr`` itself would let a file reach any attribute of any allowed object (and from there
arbitrary code), so the ``getattr`` global is bound to :func:`_history_buffer_getattr`, which resolves only those
four names on HistoryBuffer. Never ``weights_only=False`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ["mmengine_safe_globals", "safe_globals_list"]

_STATISTICS = ("min", "max", "current", "mean")  # HistoryBuffer's default statistics methods


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """The only ``getattr`` a checkpoint may call: HistoryBuffer's default statistics methods."""
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(obj, name)
    raise RuntimeError(f"weights-only load: getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) "
                       "is not allowed (only HistoryBuffer's statistics methods)")


def safe_globals_list() -> list[Any]:
    """What :func:`mmengine_safe_globals` allows: objects, or ``(replacement, "module.name")`` pairs."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [
        HistoryBuffer,
        core.multiarray._reconstruct,  # numpy arrays: the histories
        core.multiarray.scalar,  # numpy scalars: the message hub's eta
        np.ndarray,
        np.dtype,
        np.dtypes.Float64DType,
        np.dtypes.Int64DType,
        (_history_buffer_getattr, "builtins.getattr"),
    ]


@contextlib.contextmanager
def mmengine_safe_globals() -> Iterator[None]:
    """Within the context, ``torch.load(weights_only=True)`` (mmengine's load path included) accepts our
    mmengine / mmdet checkpoints, and nothing beyond the globals of :func:`safe_globals_list`."""
    with torch.serialization.safe_globals(safe_globals_list()):
        yield

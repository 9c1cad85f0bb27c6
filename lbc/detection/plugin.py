"""Registers lbc's MMDetection components; a plain mmdet config needs only
``custom_imports = dict(imports=["lbc.detection.plugin"], allow_failed_imports=False)``.

Registered (mmdet registries, scope ``mmdet``): MODELS ``SparseDetector``, HOOKS ``SparsityHook``,
OPTIM_WRAPPER_CONSTRUCTORS ``SparsityOptimWrapperConstructor``, LOOPS ``ResumableEpochLoop``, DATA_SAMPLERS
``ResumableBatchSampler``. Checkpoints of these runs load under
:func:`mmengine_safe_globals` (torch's weights-only loading).
"""

from __future__ import annotations

from lbc.detection.checkpoint import mmengine_safe_globals
from lbc.detection.hook import SparsityHook, find_sparsity
from lbc.detection.loop import ResumableBatchSampler, ResumableEpochLoop
from lbc.detection.model import SparseDetector
from lbc.detection.optim import SparsityOptimWrapperConstructor

__all__ = ["ResumableBatchSampler", "ResumableEpochLoop", "SparseDetector", "SparsityHook",
           "SparsityOptimWrapperConstructor", "find_sparsity", "mmengine_safe_globals"]

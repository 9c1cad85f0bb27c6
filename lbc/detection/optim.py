"""``SparsityOptimWrapperConstructor``: mmengine's default optimizer construction, with the sparsity method's groups.

A sparsity method's own parameters (LBC's scores) must not get the model's parameter-wise rules (lr / decay
multipliers, norm rules): they take the method's groups (``sp.param_groups(weight_decay)``, the method's
weight decay), each score exactly once. Everything else is mmengine's ``DefaultOptimWrapperConstructor``,
``paramwise_cfg`` included.
"""

from __future__ import annotations

import inspect
from typing import Any

from mmdet.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

from lbc.detection.hook import find_sparsity

__all__ = ["SparsityOptimWrapperConstructor"]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class SparsityOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """The default constructor over the model's parameters without ``sp.score_parameters()``, plus
    ``sp.param_groups(<optimizer weight_decay>)``.

    Use with ``optim_wrapper=dict(constructor='SparsityOptimWrapperConstructor', optimizer=..., paramwise_cfg=...)``
    and ``model=dict(type='SparseDetector', ...)``.
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optimizer wrapper for ``model`` (a SparseDetector, possibly wrapped)."""
        if hasattr(model, "module"):
            model = model.module
        sparsity = find_sparsity(model)
        owned = {id(p) for p in sparsity.score_parameters()}
        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg.setdefault("type", "OptimWrapper")
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg["type"]
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))  # params (model_params for some)
        groups: list[dict[str, Any]]
        if not self.paramwise_cfg:
            groups = [{"params": [p for p in model.parameters() if id(p) not in owned]}]
        else:
            groups = []
            self.add_params(groups, model)  # one group per parameter, mmengine's rules
            groups = [g for g in groups if not any(id(p) in owned for p in g["params"])]
        groups += sparsity.param_groups(_weight_decay(optimizer_cfg, optimizer_cls))
        optimizer_cfg[first_arg] = [g for g in groups if g["params"]]
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args={"optimizer": optimizer})


def _weight_decay(optimizer_cfg: dict, optimizer_cls: Any) -> float:
    """The optimizer's weight decay: the config's, else the optimizer class's default (AdamW: 0.01), else 0."""
    if optimizer_cfg.get("weight_decay") is not None:
        return float(optimizer_cfg["weight_decay"])
    param = inspect.signature(optimizer_cls).parameters.get("weight_decay")
    default = None if param is None else param.default
    return float(default) if isinstance(default, (int, float)) else 0.0

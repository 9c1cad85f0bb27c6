"""Counting as the paper counts: multiply-accumulates at test time (Table 4) and training FLOPs (Table 1).

MACs come from ``torch.utils.flop_counter``; :class:`TrainingFlops` turns per-layer costs and the
densities a method trains at into Table 1's "FLOPs (Train)" column, relative to the dense model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one input of shape ``input_size`` (C, H, W): total and per module.

    The per-module figures are keyed by the module's name in ``model`` (``""`` is the root) and
    include the module's children; FLOPs are 2 x MACs. Runs in eval mode on the model's device.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    per_module: dict[str, int] = {}
    root = type(model).__name__
    for fqn, ops in counter.get_flop_counts().items():
        if fqn == "Global":
            continue
        name = "" if fqn == root else fqn.split(".", 1)[1] if fqn.startswith(root + ".") else fqn
        per_module[name] = sum(ops.values()) // 2
    return counter.get_total_flops() // 2, per_module


def layer_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """MACs of each Conv2d/Linear layer of ``model`` for one input of shape ``input_size``."""
    _, per_module = count_macs(model, input_size)
    return {
        name: per_module.get(name, 0)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


def layer_costs(model: nn.Module, input_size: tuple[int, ...] | list[int] | None = None) -> dict[str, float]:
    """Dense cost of each Conv2d/Linear layer: its MACs for one input of ``input_size`` (as the paper
    counts), or its weight count when no size is given or the layer did not run."""
    macs = layer_macs(model, tuple(input_size)) if input_size else {}
    return {
        name: float(macs.get(name, 0) or module.weight.numel())
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


class TrainingFlops:
    """Training FLOPs relative to the dense model, integrated over the epochs (paper Table 1, "FLOPs (Train)").

    A training step of a layer costs ``layer_cost[name] * unit_cost(density)``: forward 1 unit and
    backward 2, relative to dense, at the density the method trains that layer at (Table 1: SR-STE
    2:4 pays (0.5 + 2) / 3 = 0.83x for its dense backward). The model's step cost changes only when
    a mask does, so the meter keeps a timeline of ``(epoch, step cost)`` and integrates it.
    """

    def __init__(self, layer_cost: dict[str, float], unit_cost: Callable[[float], float]) -> None:
        self.layer_cost = dict(layer_cost)
        self.unit_cost = unit_cost
        self.timeline: list[tuple[float, float]] = []

    def step_cost(self, densities: dict[str, float]) -> float:
        """Cost of one step at ``densities`` (every layer of ``layer_cost``) over the dense step's."""
        total = sum(self.layer_cost.values()) or 1.0
        return sum(c * self.unit_cost(densities[n]) for n, c in self.layer_cost.items()) / total

    def record(self, epoch: float, densities: dict[str, float]) -> None:
        """Note that from ``epoch`` on a step costs ``step_cost(densities)`` (call when a mask changes)."""
        cost = self.step_cost(densities)
        if self.timeline and self.timeline[-1][0] >= epoch:
            self.timeline[-1] = (epoch, cost)
        else:
            self.timeline.append((epoch, cost))

    def train_flops_ratio(self, end: float) -> float:
        """Training FLOPs from epoch 0 to ``end`` over the dense model's: the timeline's mean up to ``end``."""
        if end <= 0:
            return self.timeline[0][1]
        spent = 0.0
        for i, (start, cost) in enumerate(self.timeline):
            stop = self.timeline[i + 1][0] if i + 1 < len(self.timeline) else end
            spent += cost * max(0.0, min(stop, end) - start)
        return spent / end

    def state_dict(self) -> dict[str, Any]:
        return {"cost_timeline": list(self.timeline)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timeline = [tuple(x) for x in state["cost_timeline"]]

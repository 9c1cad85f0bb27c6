"""Counting as the paper counts: multiply-accumulates at test time (Table 4) and training FLOPs (Table 1).

MACs come from ``torch.utils.flop_counter``; :class:`TrainingFlops` turns per-layer costs and the
densities a method trains at into Table 1's "FLOPs (Train)" column, relative to the dense model.
"""

from __future__ import annotations

import math
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

    With ``measure_later`` the per-layer costs arrive after some of the timeline was recorded
    (measured on the first forward, see :class:`MacProbe`): the meter then also keeps each entry's
    densities, recomputes the timeline in :meth:`set_layer_cost` and saves both in its state.
    """

    def __init__(
        self, layer_cost: dict[str, float], unit_cost: Callable[[float], float], measure_later: bool = False
    ) -> None:
        self.layer_cost = dict(layer_cost)
        self.unit_cost = unit_cost
        self.measure_later = measure_later
        self.measured = False  # layer_cost holds MACs measured on a forward
        # (epoch, step cost, densities or None): densities are kept only while costs may change
        self._entries: list[tuple[float, float, dict[str, float] | None]] = []

    def step_cost(self, densities: dict[str, float]) -> float:
        """Cost of one step at ``densities`` (every layer of ``layer_cost``) over the dense step's."""
        total = sum(self.layer_cost.values()) or 1.0
        return sum(c * self.unit_cost(densities[n]) for n, c in self.layer_cost.items()) / total

    @property
    def timeline(self) -> list[tuple[float, float]]:
        """``(epoch, step cost)`` from each recorded epoch on."""
        return [(epoch, cost) for epoch, cost, _ in self._entries]

    def record(self, epoch: float, densities: dict[str, float]) -> None:
        """Note that from ``epoch`` on a step costs ``step_cost(densities)`` (call when a mask changes)."""
        entry = (epoch, self.step_cost(densities), dict(densities) if self.measure_later else None)
        if self._entries and self._entries[-1][0] >= epoch:
            self._entries[-1] = entry
        else:
            self._entries.append(entry)

    def set_layer_cost(self, layer_cost: dict[str, float]) -> None:
        """Use the measured ``layer_cost`` (MACs) from now on, and for the timeline recorded so far."""
        self.layer_cost = {name: float(layer_cost.get(name, cost)) for name, cost in self.layer_cost.items()}
        self.measured = True
        self._entries = [(e, self.step_cost(d) if d is not None else c, d) for e, c, d in self._entries]

    def train_flops_ratio(self, end: float) -> float:
        """Training FLOPs from epoch 0 to ``end`` over the dense model's: the timeline's mean up to ``end``."""
        timeline = self.timeline
        if end <= 0:
            return timeline[0][1]
        spent = 0.0
        for i, (start, cost) in enumerate(timeline):
            stop = timeline[i + 1][0] if i + 1 < len(timeline) else end
            spent += cost * max(0.0, min(stop, end) - start)
        return spent / end

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cost_timeline": self.timeline}
        if self.measure_later:  # what recomputes the timeline: each entry's densities, the measured costs
            state["density_timeline"] = [(e, d) for e, _, d in self._entries]
            state["layer_cost"] = dict(self.layer_cost) if self.measured else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layer_cost"):
            self.layer_cost = {name: float(state["layer_cost"].get(name, c)) for name, c in self.layer_cost.items()}
            self.measured = True
        densities = state.get("density_timeline") or [(e, None) for e, _ in state["cost_timeline"]]
        self._entries = [
            (float(e), float(c), dict(d) if d is not None and self.measure_later else None)
            for (e, c), (_, d) in zip(state["cost_timeline"], densities, strict=True)
        ]


class MacProbe:
    """Measures each Conv2d/Linear layer's MACs on the first forward of ``model``, then removes itself.

    A method's cost figures need per-layer MACs, but not every model can run a made-up input
    (a detector takes images plus annotations): the probe watches the first real forward, whatever
    its input, and hands ``{layer: MACs}`` to ``on_measured``. A layer called several times (a
    detection head shared by the FPN levels) adds up its calls; one that did not run keeps its cost.
    """

    def __init__(self, model: nn.Module, on_measured: Callable[[dict[str, float]], None]) -> None:
        self.macs: dict[str, float] = {}
        self.on_measured = on_measured
        self.finished = False  # hooks copied with the model (deepcopy for EMA) must not count again
        self.handles = [
            module.register_forward_hook(self._count(name))
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        ]
        self.handles.append(model.register_forward_hook(self._done))

    def _count(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not self.finished and not torch.compiler.is_compiling() and isinstance(output, torch.Tensor):  # each output element costs one dot product over the fan-in
                if isinstance(module, nn.Linear):
                    fan_in = module.in_features
                else:  # from the module's sizes: reading module.weight would run a parametrisation
                    fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
                self.macs[name] = self.macs.get(name, 0.0) + float(output.numel() * fan_in)
        return hook

    def _done(self, *args: Any) -> None:
        if self.finished or torch.compiler.is_compiling():  # a compiled forward is not measured
            return
        self.remove()
        if self.macs:
            self.on_measured(self.macs)

    def remove(self) -> None:
        self.finished = True
        for handle in self.handles:
            handle.remove()
        self.handles = []

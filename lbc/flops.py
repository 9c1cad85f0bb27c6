"""Counting multiply-accumulates as the paper counts them, with ``torch.utils.flop_counter``."""

from __future__ import annotations

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

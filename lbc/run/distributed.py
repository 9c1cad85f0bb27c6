"""torchrun/DDP plumbing: process group set-up, rank helpers, reductions, the DDP (re)wrap, shutdown."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lbc.errors import ConfigError

log = logging.getLogger("lbc")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_by_torchrun():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(f"trainer.device={name}: this machine has {have}; use trainer.device=auto or cpu")
        torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> None:
    """Join the process group when started by torchrun (nccl on CUDA, gloo on CPU); no-op otherwise."""
    if launched_by_torchrun() and not is_distributed():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running stats) on every rank: DDP syncs them only before a forward."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself.

    DDP fixes the set of parameters it reduces at construction: a sparsity method's own tensors
    must be excluded before (``SparsityMethod.exclude_from_ddp``), so that freezing its scores
    later needs no new wrapper.
    """
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def shutdown() -> None:
    """Leave the process group and exit at once: gloo sometimes aborts at interpreter exit.

    Only call after a clean end of training; ``os._exit`` skips the remaining atexit handlers.
    """
    if not is_distributed():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Replica:
    """The model as the training step calls it: DDP-wrapped (and compiled) when asked.

    ``module`` is the plain model (state dicts, EMA, evaluation); it is wrapped once.
    """

    def __init__(
        self, module: nn.Module, device: torch.device, compile: bool = False, find_unused_parameters: bool = False
    ) -> None:
        self.module = module
        wrapped = wrap(module, device, find_unused_parameters)
        self.forward: nn.Module = torch.compile(wrapped) if compile else wrapped

    def train(self, mode: bool = True) -> None:
        self.forward.train(mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

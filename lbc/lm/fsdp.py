"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the language-model task, with a sparsity method attached.

:func:`shard` applies ``fully_shard`` to every decoder block (:func:`lbc.lm.model.decoder_blocks`) and to the
root. FSDP2 takes the parametrised layers as they are: the dense ``parametrizations.weight.original`` and
the method's learned tensors (LBC's ``scores``) become DTensors sharded on dim 0, all-gathered for each
forward and backward, their gradients reduce-scattered (averaged) by FSDP; the method's buffers (masks,
alive sets) are not sharded and stay equal on every rank, as under DDP. FSDP2 replaces the parameter
objects, so the gradient-averaging hooks the method put on them at attach
(:func:`lbc.sparsity.base.average_gradient_across_processes`) are left on the old objects and never
fire: there is no second reduction.

What a loop must do differently from DDP (no :class:`lbc.run.distributed.Replica`):

- build the optimizer after :func:`shard` (it must hold the sharded parameters);
- call ``method.update(step)`` inside :func:`full_tensors`: the method reads and writes whole tensors;
- evaluate inside :func:`gathered`: the ranks run different numbers of forwards over their windows,
  which FSDP's per-forward all-gathers cannot;
- save :func:`full_state` / restore with :func:`load_full_state` (every rank calls both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

try:
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without torch.distributed: nothing is ever sharded
    FSDPModule = DTensor = type("Unavailable", (), {})  # type: ignore[assignment,misc]

from lbc.errors import ConfigError
from lbc.lm.model import decoder_blocks
from lbc.sparsity.base import disable_folding


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` every decoder block and the root of ``model`` (in place; returned for chaining).

    Call after the sparsity method is attached (and started from its prior), before the optimizer is built:
    the method's learned tensors are sharded with their block's weights. ``device``: the ranks' device type
    picks the mesh (cpu: gloo, cuda: nccl).
    """
    blocks = decoder_blocks(model)
    if blocks is None:
        raise ConfigError(f"trainer.fsdp=true: {type(model).__name__} has no decoder blocks to shard "
                          "(no nn.ModuleList of its _no_split_modules classes)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    disable_folding(model)  # the optimizer will hold shards: masks stay multiplies
    return model


def is_sharded(target: nn.Module | torch.optim.Optimizer) -> bool:
    """Whether ``target`` (a model, or an optimizer over its parameters) holds sharded (DTensor) parameters."""
    if isinstance(target, torch.optim.Optimizer):
        return any(isinstance(p, DTensor) for g in target.param_groups for p in g["params"])
    return isinstance(target, FSDPModule) or any(isinstance(m, FSDPModule) for m in target.modules())


def _method_tensors(method: Any) -> Iterator[tuple[nn.Module, str]]:
    """(module, name) of every parameter a method's update may read: each masked layer's stored weight and the
    parameters of its parametrisation (LBC's scores)."""
    for layer in method.layers.values():
        if parametrize.is_parametrized(layer, "weight"):
            plist = layer.parametrizations.weight
            yield plist, "original"
            for module in plist[0].modules():
                for name in list(module._parameters):
                    yield module, name


@contextlib.contextmanager
def full_tensors(method: Any) -> Iterator[None]:
    """The method's layers with whole (all-gathered) tensors in place of their shards, for ``method.update``.

    Every rank computes the same update from the same whole tensors; on exit each sharded parameter takes
    its slice of what the method wrote (LBC's released removal zeroes scores) and the ``requires_grad`` it
    set (LBC freezes its scores at t_f; a frozen one loses its gradient). Holds every layer's whole
    weight and scores at once while inside. Collective: every rank must enter.
    """
    swapped: list[tuple[nn.Module, str, DTensor, nn.Parameter]] = []
    try:
        for module, name in _method_tensors(method):
            shard_ = module._parameters[name]
            if isinstance(shard_, DTensor):
                whole = nn.Parameter(shard_.detach().full_tensor(), requires_grad=shard_.requires_grad)
                module._parameters[name] = whole
                swapped.append((module, name, shard_, whole))
        yield
    finally:
        with torch.no_grad():
            for module, name, shard_, whole in swapped:
                module._parameters[name] = shard_
                local = distribute_tensor(whole.detach(), shard_.device_mesh, shard_.placements, src_data_rank=None)
                shard_.to_local().copy_(local.to_local())
                if whole.requires_grad != shard_.requires_grad:
                    shard_.requires_grad_(whole.requires_grad)
                if not whole.requires_grad:
                    shard_.grad = None


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP module of ``model`` unsharded and kept so for each forward: forwards need no collective, so
    the ranks may run different numbers of them (evaluation over each rank's windows). Collective on entry."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_reshard_after_forward(m is not model, recurse=False)  # as shard() left them (root: False)
            m.reshard()


def _full(value: Any) -> Any:
    """``value`` with every DTensor in it (nested dicts and lists) replaced by its whole tensor on the CPU."""
    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    if isinstance(value, dict):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full(v) for v in value)
    return value


def full_state(module_or_optimizer: nn.Module | torch.optim.Optimizer) -> dict[str, Any]:
    """The state dict of a sharded model (or of its optimizer) with whole tensors, as a 1-process run saves it.
    Collective: every rank calls it (rank 0 writes it). Not sharded: its ``state_dict()`` as it is."""
    state = module_or_optimizer.state_dict()
    return _full(state) if is_sharded(module_or_optimizer) else state


def _shard_like(value: Any, like: Any) -> Any:
    """``value`` with each whole tensor cut to this rank's slice of the DTensor at its place in ``like``."""
    if isinstance(like, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        if tuple(value.shape) == tuple(like.shape):
            return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
        return value
    if isinstance(like, dict) and isinstance(value, dict):
        return {k: _shard_like(v, like.get(k)) for k, v in value.items()}
    return value


def load_full_state(module_or_optimizer: nn.Module | torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole-tensor state dict (:func:`full_state`, or a 1-process checkpoint) into a sharded model or its
    optimizer (built over the sharded parameters): each rank keeps its slice of every sharded tensor. Not
    sharded: its ``load_state_dict``."""
    if not is_sharded(module_or_optimizer):
        module_or_optimizer.load_state_dict(state)
        return
    if isinstance(module_or_optimizer, torch.optim.Optimizer):
        params = [p for g in module_or_optimizer.param_groups for p in g["params"]]
        like = {i: {k: params[int(i)] for k in slots} for i, slots in state["state"].items()}
        state = {**state, "state": _shard_like(state["state"], like)}
    else:
        state = _shard_like(state, module_or_optimizer.state_dict())
    module_or_optimizer.load_state_dict(state)

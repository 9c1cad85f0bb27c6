"""The batch each process loads and the lr it uses: plain arithmetic shared by the config checks, the
data loader and the runners (no torch, no Hydra: every layer may import it)."""

from __future__ import annotations

from lbc.errors import ConfigError, require

__all__ = ["per_process_batch", "scaled_lr"]


def per_process_batch(batch_size: int | None, global_batch_size: int | None, world_size: int) -> int:
    """The batch each of ``world_size`` processes loads (``data.loader``): ``batch_size`` as given, or
    ``global_batch_size / world_size``, which must divide; exactly one of the two is set."""
    if batch_size is not None and global_batch_size is not None:
        raise ConfigError(f"data.loader.batch_size={batch_size} and data.loader.global_batch_size={global_batch_size} "
                          "are both set; set one (per process, or all processes together) and the other to null")
    if global_batch_size is None:
        require(batch_size is not None, "data.loader.batch_size", batch_size,
                "set data.loader.batch_size (per process) or data.loader.global_batch_size (all processes together)")
        return batch_size
    if global_batch_size % world_size:
        raise ConfigError(f"data.loader.global_batch_size={global_batch_size} does not divide over {world_size} "
                          f"processes; use a multiple of {world_size}, or another number of processes")
    return global_batch_size // world_size


def scaled_lr(lr: float, global_batch_size: int, auto_scale_lr: int | None) -> float:
    """The lr a run uses (``trainer.auto_scale_lr``): ``lr`` as given when null, else the linear scaling rule
    ``lr * global_batch_size / auto_scale_lr`` (``optim.lr`` is the lr for a total batch of ``auto_scale_lr``)."""
    return lr if auto_scale_lr is None else lr * global_batch_size / auto_scale_lr

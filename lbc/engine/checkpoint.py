"""Checkpoints: atomic writes, the RNG states that make resume exact, and the checks that run before
anything of a checkpoint is loaded (is it ours, does it fit this model, method and optimizer); which config
changes a resume honours is lbc.run.resume's, by the rules beside the schema fields.

Everything a checkpoint holds loads with ``torch.load(..., weights_only=True)`` (:func:`lbc.io.read_pt`):
tensors, numbers, strings and plain containers. numpy's RNG state is therefore stored as a dict of
a tensor and numbers (:func:`rng_state`), not as numpy's own tuple with an ndarray.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbc.errors import ConfigError
from lbc.io import atomic_write, read_pt

# --- RNG states ---------------------------------------------------------------------------------


def numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as a tensor and numbers (weights-only loadable), exact."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),  # uint32 values, int64: no overflow
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def set_numpy_rng_state(state: Mapping[str, Any] | tuple) -> None:
    """Inverse of :func:`numpy_rng_state` (numpy's own tuple is taken too)."""
    if isinstance(state, tuple):
        np.random.set_state(state)
        return
    keys = torch.as_tensor(state["keys"]).numpy().astype(np.uint32)
    np.random.set_state((str(state["bit_generator"]), keys, int(state["pos"]), int(state["has_gauss"]),
                         float(state["cached_gaussian"])))


def rng_state() -> dict[str, Any]:
    """Every random generator the training step can touch: torch, cuda, numpy, python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": numpy_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None | float): plain
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    set_numpy_rng_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective under torchrun: call it on every rank).

    A checkpoint stores this list: each rank's random stream differs (its own data, its own random draws:
    a detector's samplers draw as many numbers as its proposals), so one rank's states cannot stand for all.
    """
    from lbc.run import distributed

    return distributed.all_gather_object(rng_state())


def restore_rng_states(states: list[dict[str, Any]] | dict[str, Any]) -> bool:
    """Set this rank's RNG states from a checkpoint's :func:`gather_rng_states` list; the one rule of every task.

    With as many ranks as wrote it, each rank takes its own and ``True`` is returned. With another count, every
    rank takes rank 0's (``False``: the caller decides what else cannot continue exactly). A bare dict (one
    process's :func:`rng_state`, as detection checkpoints held before) counts as a list of one.
    """
    from lbc.run import distributed

    listed = [states] if isinstance(states, Mapping) else list(states)
    same_world = len(listed) == distributed.world_size()
    set_rng_state(listed[distributed.rank()] if same_world else listed[0])
    return same_world


# --- writing ------------------------------------------------------------------------------------


def save(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` through :func:`lbc.io.atomic_write`: never half a file, permissions as the umask says.

    A temp file (``.<name>.<random>.tmp``) left by a killed process is removed by :func:`clean_stale_temp`.
    """
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def copy(src: str | Path, dst: str | Path) -> None:
    """Atomic copy of a written checkpoint (milestones), through :func:`lbc.io.atomic_write`."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


# The temp names atomic_write uses (".<name>.<mkstemp's 8 characters>.tmp"; ".<name>.tmp" from older versions),
# for checkpoint names ending in .pt.
_TEMP = re.compile(r"\.[^/]+\.pt(\.[A-Za-z0-9_]+)?\.tmp")


def clean_stale_temp(run_dir: str | Path) -> list[Path]:
    """Remove the temp files an earlier, killed save or copy left in ``run_dir``; returns them.

    Call at start, before this run writes: only files named like ours (``.<name>.pt.<random>.tmp``,
    ``.<name>.pt.tmp``) directly in ``run_dir`` are touched.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.glob(".*.tmp")):
        if _TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --- reading and checking -----------------------------------------------------------------------


def load(path: str | Path, key: str = "trainer.resume") -> dict[str, Any]:
    """Read a checkpoint onto the CPU, weights only; a one-line ConfigError naming ``key`` if it can't be."""
    return read_pt(path, key)


# What Training.state() writes and Training.load() needs (scaler, ema and metrics are optional).
REQUIRED = ("sparsity", "model", "optimizer", "scheduler", "epoch", "rng", "config")


def _where(key: str, path: str | Path | None) -> str:
    return f"{key}={str(path)!r}" if path is not None else key


def _shape(v: Any) -> list[int] | None:
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def check_compatible(
    ckpt: Any,
    expected_sparsity: Mapping[str, Any],
    key: str = "trainer.resume",
    path: str | Path | None = None,
    *,
    model_state: Mapping[str, Any] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
) -> None:
    """Before anything of ``ckpt`` is loaded: is it an lbc training checkpoint, and does it fit this run?

    ``expected_sparsity`` is this run's ``sparsity.state_dict()`` (its ``method`` and ``pattern``
    are compared); ``model_state`` / ``optimizer_state`` this run's ``state_dict()``s (keys and
    shapes; parameter groups). Every mismatch is one ConfigError line naming ``key`` (and ``path``).
    """
    where = _where(key, path)
    hint = "to start from model weights use trainer.init_from"
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{where} is not an lbc training checkpoint (it holds a {type(ckpt).__name__}); {hint}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ConfigError(f"{where} is not an lbc training checkpoint (no {missing[0]!r} entry); {hint}")
    sp = ckpt["sparsity"]
    if not isinstance(sp, dict) or not isinstance(ckpt["model"], dict):
        raise ConfigError(f"{where} is not an lbc training checkpoint (its 'sparsity' or 'model' entry is not a dict)")
    saved = f"{sp.get('method')} {sp.get('pattern')}"
    wanted = f"{expected_sparsity.get('method')} {expected_sparsity.get('pattern')}"
    if saved != wanted:
        raise ConfigError(
            f"{where}: sparsity state is for {saved}, not {wanted}: resume with the same sparsity config, "
            "or start a new run_dir"
        )
    if model_state is not None:
        _check_model(ckpt["model"], model_state, where)
    if optimizer_state is not None:
        _check_optimizer(ckpt["optimizer"], optimizer_state, where)


def _check_model(saved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first {unexpected[0]!r})")
    if not parts:
        shapes = [k for k in expected if _shape(saved[k]) != _shape(expected[k])]
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape(s) differ (first {k!r}: {_shape(saved[k])} in the checkpoint, "
                         f"{_shape(expected[k])} in the model)")
    if parts:
        raise ConfigError(f"{where} does not fit the model: {', '.join(parts)}; was it written for another model.*?")


# Per-group flags a torch version may add or drop for every optimizer alike: not a different optimizer.
_IMPLEMENTATION_FLAGS = {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}


def _check_optimizer(saved: Any, expected: Mapping[str, Any], where: str) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ConfigError(f"{where} holds no optimizer state dict (no 'param_groups')")
    mine = expected["param_groups"]
    if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in mine]:
        raise ConfigError(
            f"{where}: optimizer state does not fit: parameter groups of "
            f"{[len(g.get('params', ())) for g in groups]} parameters, this run has {[len(g['params']) for g in mine]}"
        )
    for g, m in zip(groups, mine, strict=True):
        odd = sorted((set(g) ^ set(m)) - _IMPLEMENTATION_FLAGS)
        if odd:
            raise ConfigError(
                f"{where}: optimizer state is for another optimizer (its parameter groups differ in "
                f"{', '.join(odd[:4])}): resume with the same optim config, or start a new run_dir"
            )

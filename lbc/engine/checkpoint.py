"""Checkpoints written atomically (temp file + os.replace; stale temp files of killed saves removed at
start), and the RNG states that make resume exact.

Everything a checkpoint holds loads with ``torch.load(..., weights_only=True)`` (:func:`lbc.io.read_pt`):
tensors, numbers, strings and plain containers. numpy's RNG state is therefore stored as a dict of
a tensor and numbers (:func:`rng_state`), not as numpy's own tuple with an ndarray.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbc.io import read_pt

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


# --- writing ------------------------------------------------------------------------------------


def save(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: never half a file.

    The temp file is ``.<name>.<random>.tmp``; one left by a killed process is removed by
    :func:`clean_stale_temp`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy(src: str | Path, dst: str | Path) -> None:
    """Atomic copy of a written checkpoint (milestones), through ``.<name>.tmp``."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# The temp names save() (".<name>.<mkstemp's 8 characters>.tmp") and copy() (".<name>.tmp") use,
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


# --- reading -------------------------------------------------------------------------------


def load(path: str | Path, key: str = "trainer.resume") -> dict[str, Any]:
    """Read a checkpoint onto the CPU, weights only; a one-line ConfigError naming ``key`` if it can't be."""
    return read_pt(path, key)

"""Checkpoints written atomically (temp file + os.replace), and the RNG states that make resume exact."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lbc.io import read_pt


def rng_state() -> dict[str, Any]:
    """Every random generator the training step can touch: torch, cuda, numpy, python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``: never half a file."""
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
    """Atomic copy of a written checkpoint (milestones)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; a one-line ConfigError naming ``trainer.resume`` if it can't be."""
    return read_pt(path, "trainer.resume")

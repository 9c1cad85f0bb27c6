"""Reading ``.pt`` files at the boundary: a missing or broken file is one line naming the config key."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lbc.errors import ConfigError


def read_pt(path: str | Path, key: str) -> Any:
    """``torch.load`` onto the CPU; a ConfigError naming ``key`` if the file is missing or unreadable.

    Not weights-only: our checkpoints also hold RNG states and the config.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}={str(path)!r} is not a readable checkpoint: {first}") from None

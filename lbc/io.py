"""Reading ``.pt`` files at the boundary: a missing or broken file is one line naming the config key."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def load_model_weights(model: nn.Module, path: str | Path, key: str) -> None:
    """Load the dense weights of a checkpoint into ``model`` (before a sparsity method is attached).

    Accepts ``{"model": state_dict}`` (our checkpoints) or a plain state dict; strips DDP's
    ``module.`` prefixes and drops a sparsity method's own tensors (keys with ``.parametrizations.``:
    masks and scores of the earlier run are not ours). Every problem is a one-line ConfigError
    naming ``key``: a missing or unreadable file, no state dict inside, keys or shapes that do not fit.
    """
    state = read_pt(path, key)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"{key}={str(path)!r} holds no state dict (expected a 'model' entry or a state dict)")
    state = {k.removeprefix("module."): v for k, v in state.items() if ".parametrizations." not in k}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ConfigError(f"{key}={str(path)!r} does not fit the model: {first}") from None

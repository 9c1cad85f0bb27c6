"""Fixtures only; shared helpers live in ``tests/helpers.py`` (import from there, not from here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from tests.helpers import TINY, compose_config


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_config(*overrides, run_dir=...)``: a tiny config writing into ``tmp_path`` by default."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make

"""Shared test helpers: compose the Hydra config the way tools/train.py does, tiny overrides for instant runs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import lbc.config  # noqa: F401  (registers the div/mul resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PYTHON = sys.executable

# A few steps of digits on resnet_small: seconds, not minutes.
TINY = [
    "trainer=smoke",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "data.loader.batch_size=16",
    "data.loader.workers=0",
]


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The composed config for ``overrides``, as ``tools/train.py`` would get it (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_config(*overrides, run_dir=...)``: a tiny config writing into ``tmp_path`` by default."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make

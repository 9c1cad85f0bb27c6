"""Fixtures only; shared helpers live in ``tests/helpers.py`` (import from there, not from here)."""

from __future__ import annotations

import os

# One thread per test process, in this process (set before torch is imported) and in the subprocesses the tests
# start: pytest-xdist runs two test processes on the two cores (pyproject's addopts), and results compared
# between a subprocess and this process come from the same thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from tests.helpers import TINY, compose_config  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_config(*overrides, run_dir=...)``: a tiny config writing into ``tmp_path`` by default."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        return compose_config([*TINY, f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make

"""Fixtures of the export tests: tiny real training runs (through lbc-train), made once and shared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TINY, run_cli

# resnet_small on digits, a few steps per epoch. LBC: candidates removed at epoch 1 (t_f=1), so its
# second epoch trains an exactly 2:4 mask (and keeps EMA weights); ASP prunes before the first step.
RUNS = {
    "lbc": ["sparsity=lbc", "sparsity.t_f=1", "trainer.ema=true"],
    "srste": ["sparsity=srste", "schedule.epochs=1"],
    "asp": ["sparsity=asp", "sparsity.dense_epochs=0", "schedule.epochs=1"],
}


@pytest.fixture(scope="package")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``trained(method)``: the run directory of a finished tiny run of ``method`` (trained on first use)."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            run_dir = tmp_path_factory.mktemp(f"run_{method}") / "run"
            code, out, err = run_cli(*TINY, *RUNS[method], f"run_dir={run_dir}")
            assert code == 0 and (run_dir / "last.pt").is_file(), out[-2000:] + err[-2000:]
            done[method] = run_dir
        return done[method]

    return get


@pytest.fixture(scope="package")
def lbc_export(trained: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lbc-export --onnx`` of the LBC run: an export directory shared by the export and check tests."""
    from lbc.cli.export import main

    out = tmp_path_factory.mktemp("export") / "lbc"
    assert main([str(trained("lbc")), "--out", str(out), "--onnx", "--quiet"]) == 0
    return out

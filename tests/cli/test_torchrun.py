"""``lbc-torchrun``: torchrun -m lbc.cli.train, with a start-up error as one line and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lbc.cli.torchrun import split_argv


def test_split_argv_at_the_first_override_or_double_dash():
    assert split_argv(["--nproc_per_node=2", "--standalone", "optim.lr=1", "-m"]) == (
        ["--nproc_per_node=2", "--standalone"], ["optim.lr=1", "-m"])
    assert split_argv(["--nnodes", "2", "--", "experiment=x"]) == (["--nnodes", "2"], ["experiment=x"])


@pytest.mark.slow
def test_a_config_error_under_two_processes_is_one_line_and_no_folder(tmp_path):
    script = Path(sys.executable).with_name("lbc-torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(script), "--standalone", "--nproc_per_node=2", "optim.lr=-1",
                           f"run_dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: optim.lr=-1.0 is not allowed; use a positive number"]
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "run").exists()

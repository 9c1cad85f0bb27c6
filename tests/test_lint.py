"""The code passes ruff with the settings in pyproject.toml (the same check a reviewer runs)."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    assert ruff, "ruff is in the test extra: pip install -e '.[test]'"
    proc = subprocess.run([ruff, "check", "lbc", "tests", "tools", "benchmarks", "examples", "scripts"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]

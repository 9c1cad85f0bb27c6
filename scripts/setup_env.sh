#!/usr/bin/env bash
# Create .venv (if missing) and install lbc into it, editable, with its test extra, at the exact
# versions of requirements.txt (the lock, used as pip constraints): torch and torchvision first, then
# the package. Idempotent: when everything is installed at the locked versions it returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if "$VPY" - <<'PYEOF' 2>/dev/null
# Up to date = lbc importable from this checkout, its console scripts installed, every locked
# requirement installed at a version the lock allows.
import importlib.metadata as md, shutil, sys
from pathlib import Path
from packaging.requirements import Requirement
import lbc
if Path(lbc.__file__).resolve().parent != Path("lbc").resolve() or md.version("lbc") != lbc.__version__:
    sys.exit(1)
if not all(Path(sys.executable).with_name(s).exists() for s in ("lbc-train", "lbc-summary", "lbc-torchrun")):
    sys.exit(1)
for line in Path("requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            sys.exit(1)
PYEOF
then
  echo "setup_env: .venv is up to date"
  exit 0
fi
"$VPY" -m pip install $(grep -E '^(torch|torchvision)[=<>!~ ]' requirements.txt | sed 's/#.*//' | tr -d ' ')
"$VPY" -m pip install -c requirements.txt -e ".[test]"
echo "setup_env: done (.venv)"

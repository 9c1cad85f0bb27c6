#!/usr/bin/env bash
# Create .venv (if missing) and install lbc into it: torch+torchvision first (pinned in
# requirements.txt), then the rest, then the package itself (editable). Idempotent: a second run
# only checks and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if "$VPY" - <<'PYEOF' 2>/dev/null
# Up to date = lbc importable and every requirement installed at a version requirements.txt allows.
import importlib.metadata as md, sys
from pathlib import Path
from packaging.requirements import Requirement
import lbc  # noqa: F401
md.version("lbc")
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
"$VPY" -m pip install -r requirements.txt
"$VPY" -m pip install -e . --no-deps || "$VPY" -m pip install -e . --no-deps --no-build-isolation
echo "setup_env: done (.venv)"

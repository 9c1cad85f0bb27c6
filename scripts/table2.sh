#!/usr/bin/env bash
# Table 2 of the paper, every row: bash scripts/table2.sh [--scale small] [--seeds 0,1,2] [--dry-run] [key=value ...]
# (options: scripts/reproduce.py --help). Python: $PYTHON, else the checkout's .venv, else python on PATH.
here="$(dirname "$0")"
[ -x "$here/../.venv/bin/python" ] && : "${PYTHON:=$here/../.venv/bin/python}"
exec "${PYTHON:-python}" "$here/reproduce.py" --table table2 "$@"

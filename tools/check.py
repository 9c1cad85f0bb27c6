#!/usr/bin/env python
"""``python tools/check.py ...`` is ``lbc-check ...`` (see lbc/cli/check.py)."""

import sys

from lbc.cli.check import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""``python tools/summary.py ...`` is ``lbc-summary ...`` (see lbc/cli/summary.py)."""

import sys

from lbc.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())

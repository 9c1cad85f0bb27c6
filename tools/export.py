#!/usr/bin/env python
"""``python tools/export.py ...`` is ``lbc-export ...`` (see lbc/cli/export.py)."""

import sys

from lbc.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

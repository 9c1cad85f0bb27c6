#!/usr/bin/env python
"""``python tools/train.py [key=value ...]`` is ``lbc-train [key=value ...]`` (see lbc/cli/train.py)."""

from lbc.cli.train import main

if __name__ == "__main__":
    main()

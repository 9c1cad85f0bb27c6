#!/usr/bin/env python
"""Turn one of our classification checkpoints into a detector backbone init file (no downloads).

    python tools/convert_backbone.py runs/r50_lbc --out r50_lbc_backbone.safetensors
    python tools/convert_backbone.py runs/r50_lbc/last.pt --out r50_lbc_backbone.pt

CHECKPOINT is a classification run directory (its last.pt), a training checkpoint, or a plain
state dict (.pt/.pth/.safetensors) of a torchvision/timm ResNet. The file keeps the backbone (the
fc is dropped) and, for a sparse run, each layer's mask (LBC: also scores and alive sets) and the
method's state; a detector with ``init_backbone=<file>`` loads it (lbc.detection.backbone).
"""

from __future__ import annotations

import argparse
import sys

from lbc.detection.backbone import convert, describe, save_backbone
from lbc.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Convert, write, print one line of what was written; ``error: <line>`` and 2 on a ConfigError."""
    parser = argparse.ArgumentParser(prog="convert_backbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="classification run dir, its last.pt, or a state-dict file")
    parser.add_argument("--out", required=True, help="file to write: .safetensors (no pickle) or .pt")
    args = parser.parse_args(argv)
    try:
        payload = convert(args.checkpoint, key="checkpoint")
        out = save_backbone(payload, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {describe(payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

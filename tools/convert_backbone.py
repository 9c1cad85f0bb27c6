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
from pathlib import Path

from lbc.detection.backbone import convert, describe, save_backbone
from lbc.errors import ConfigError, WriteError


def check_out_file(out: str) -> Path:
    """``--out`` as a file path: not a directory, and its nearest existing folder is a directory (a missing
    one is created by the write); a one-line ConfigError otherwise, before the checkpoint is read."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out={out!r} is a directory; name a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out={out!r}: {str(parent)!r} is a file, not a directory; name a file in a directory")
    return path  # a folder that cannot be written is found by the write itself (lbc.io.WriteError, exit 1)


def main(argv: list[str] | None = None) -> int:
    """Convert, write, print one line of what was written; ``error: <line>`` and 2 on a ConfigError (1 when
    the storage refuses the write: disk full, read-only, no permission)."""
    parser = argparse.ArgumentParser(prog="convert_backbone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="classification run dir, its last.pt, or a state-dict file")
    parser.add_argument("--out", required=True, help="file to write: .safetensors (no pickle) or .pt")
    args = parser.parse_args(argv)
    try:
        check_out_file(args.out)
        payload = convert(args.checkpoint, key="checkpoint")
        out = save_backbone(payload, args.out)
    except WriteError as err:  # disk full, read-only, no permission while writing: a runtime failure
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {describe(payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

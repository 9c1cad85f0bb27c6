"""``lbc-summary``: per-layer table and test-time totals of an N:M model; the last line is JSON.

    lbc-summary --model resnet50 --pattern 1:16
    lbc-summary --model deit_small_patch16_224 --pattern 2:4

``flops_*`` are multiply-accumulates of one image (as the paper's tables count them).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from lbc.errors import ConfigError
from lbc.models import MODELS, build_model
from lbc.summary import format_table, summarize


def parse_model_options(items: list[str]) -> dict[str, Any]:
    """``--model-option KEY=VALUE`` items as builder keywords (values read as YAML); one-line error otherwise."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-option {item!r}: write it as KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), print the table and the JSON totals; the exit status."""
    parser = argparse.ArgumentParser(prog="lbc-summary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help=f"lbc's own ({', '.join(MODELS.names())}), any "
                        "torchvision or timm model name, or a prefixed one: timm/<name>, torchvision/<name>")
    parser.add_argument("--pattern", default="2:4", help="N:M pattern, e.g. 2:4, 1:16")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square input image")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--exclude", nargs="*", default=None, help="module-name globs kept dense "
                        "(default: stem and classifier)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a builder keyword (repeatable), e.g. img_size=32 for a timm ViT; values read as YAML")
    args = parser.parse_args(argv)
    try:
        options = parse_model_options(args.model_option)
        model = build_model(args.model, num_classes=args.num_classes, **options)
        size = (3, args.image_size, args.image_size)
        try:
            result = summarize(model, args.pattern, size, args.exclude)
        except (AssertionError, RuntimeError, ValueError) as err:  # the model's forward refused the input
            if isinstance(err, ConfigError):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"--image-size {args.image_size}: {args.model} cannot run a {list(size)} input: "
                              f"{first} (a timm ViT takes --model-option img_size={args.image_size})") from None
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result["rows"]))
    print(json.dumps(result["totals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

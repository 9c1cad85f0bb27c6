"""``lbc-check``: is every eligible layer of a weight file N:M? A per-layer table; exit 1 naming the layers that are not.

    lbc-check exported/my_run/model.safetensors                 # an lbc-export: model, pattern, exclusions from its config.yaml
    lbc-check weights.pt --pattern 2:4 --model resnet50         # any state dict of a supported model
    lbc-check weights.pt --pattern 2:4 --model timm/deit_small_patch16_224 --model-option img_size=32
    lbc-check exported/my_lm                                    # an export directory: its model.safetensors
    lbc-check exported/my_det                                   # a detection export: its model.pth

Groups are M consecutive input-channel weights at one output channel and kernel position, as in
training; which layers must be N:M is training's layer selection (stem and classifier dense unless
--exclude says otherwise; a layer whose input dimension M does not divide is not eligible). Without
--model or an export's config.yaml, the layers are read from the file's shapes (2-D and 4-D
``*.weight`` tensors; the first and the last 2-D one kept dense). A language-model export (lbc_export.json
beside the weights) is checked as its training selected: layers from its config.json, GPT-2's Conv1D
weights (stored (in, out)) grouped along their input dimension, a tied lm_head read from its embedding.
A detection export (model.pth, config.py, lbc_export.json) is checked on the detector config.py builds
(mmdet), the layers training made sparse. With --model or an export's config, the weights must be exactly
that model's (every key, every shape): foreign weights are refused, not checked on the keys they share.

Exit status: 0 every eligible layer is N:M; 1 some are not (named on stderr with their broken
groups); 2 bad input (a missing, corrupt, truncated or foreign file, a bad option): one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from lbc.cli.summary import parse_model_options
from lbc.errors import ConfigError, first_line
from lbc.export import (
    LayerCheck,
    check_weights,
    format_checks,
    infer_num_classes,
    read_export_config,
    read_weights,
    require_same_keys,
)
from lbc.export.detection import detection_check_inputs, detection_facts_beside
from lbc.export.lm import lm_check_inputs, lm_facts_beside
from lbc.models import build_model
from lbc.sparsity.nm import NMPattern, parse_pattern


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), check the file, print the table; the exit status."""
    parser = argparse.ArgumentParser(prog="lbc-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", metavar="WEIGHTS", help="a .safetensors file or a torch file of a state dict")
    parser.add_argument("--pattern", default=None, help="N:M pattern (default: the export's, else 2:4)")
    parser.add_argument("--model", default=None, help="the model the weights are of: an lbc, torchvision or timm "
                        "name (default: the config.yaml beside an export's weights)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a builder keyword of --model (repeatable), e.g. img_size=32; values read as YAML")
    parser.add_argument("--num-classes", type=int, default=None, help="classes of --model (default: from the weights)")
    parser.add_argument("--exclude", nargs="*", default=None, help="module-name globs that need not be N:M "
                        "(default: the export's, else the stem and the classifier)")
    parser.add_argument("--quiet", action="store_true", help="no table, only the verdict")
    args = parser.parse_args(argv)
    try:
        if args.pattern is not None:  # an empty or malformed --pattern is refused, not read as "the default"
            parse_pattern(args.pattern, key="--pattern")
        if args.num_classes is not None and args.num_classes < 1:
            raise ConfigError(f"--num-classes {args.num_classes}: use a positive integer (or leave it out)")
        if Path(args.weights).is_dir():  # an export directory
            args.weights = str(export_weights(args.weights))
        detection = detection_facts_beside(args.weights) if args.model is None else None
        lm = lm_facts_beside(args.weights) if args.model is None and detection is None else None
        if (detection or lm) is not None and (args.model_option or args.num_classes is not None):
            raise ConfigError("--model-option and --num-classes need --model")
        if detection is not None:  # a detection export: its mmdet config, the training selection
            state, model, pattern, exclude, source = detection_check_inputs(detection, args.pattern, args.exclude)
        elif lm is not None:
            state, model, pattern, exclude, source = lm_check_inputs(lm, read_weights(args.weights), args.pattern,
                                                                     args.exclude)
        else:
            state = read_weights(args.weights)
            model, pattern, exclude, source = _model_for(args, state)
        pattern = parse_pattern(pattern, key="--pattern")
        checks = check_weights(state, pattern, model, exclude)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _verdict(args, checks, pattern, source)


def export_weights(folder: str | Path) -> Path:
    """The weight file of an export directory: a detection export's ``model.pth``, else ``model.safetensors``."""
    folder = Path(folder)
    return folder / ("model.pth" if detection_facts_beside(folder / "model.pth") is not None else "model.safetensors")


def _verdict(args: argparse.Namespace, checks: list[LayerCheck], pattern: NMPattern, source: str) -> int:
    """Print the table and the verdict; the exit status (0 all eligible layers N:M, 1 some are not or none is)."""
    if not args.quiet:
        print(f"lbc-check: {args.weights}: {source}, pattern {pattern}")
        print(format_checks(checks, pattern))
    required = [c for c in checks if c.required]
    bad = [c for c in required if not c.nm]
    if not required:
        print(f"error: {args.weights}: no layer is eligible for {pattern} (each is excluded or its input dimension "
              f"is not divisible by {pattern.m}); nothing to check", file=sys.stderr)
        return 1
    if bad:
        named = ", ".join(f"{c.name} ({c.violating} of {c.groups} groups have more than {pattern.n} non-zeros)"
                          for c in bad)
        print(f"error: {len(bad)} of {len(required)} eligible layers are not {pattern}: {named}", file=sys.stderr)
        return 1
    exact = sum(c.exact_nm for c in required)
    print(f"ok: all {len(required)} eligible layers are {pattern} ({exact} exactly {pattern.n} of every {pattern.m})")
    return 0


def _model_for(args: argparse.Namespace, state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module | None, str, list[str] | None, str]:
    """(model on the meta device or None, pattern, exclude globs, where the layer list comes from)."""
    config_path = Path(args.weights).with_name("config.yaml")
    config, note = None, "no --model, no config.yaml beside it"
    if args.model is None and config_path.is_file():
        try:
            config = read_export_config(config_path)
        except ConfigError:
            if _export_like(config_path):  # an export's config.yaml with a bad (edited) value: refused
                raise
            note = f"no --model; {config_path} is not an lbc export's config"  # some other tool's: not ours
    if args.model is not None:
        options = parse_model_options(args.model_option)
        model_cfg = {"name": args.model, **options}
        num_classes = infer_num_classes(model_cfg, state, args.num_classes)
        source = f"model {args.model}"
        pattern, exclude = args.pattern or "2:4", args.exclude
    elif config is not None:
        model_cfg, num_classes = dict(config["model"]), int(config["num_classes"])
        sparsity = config.get("sparsity") or {}
        source = f"model {model_cfg.get('name')} from {config_path}"
        pattern = args.pattern or sparsity.get("pattern") or "2:4"
        exclude = args.exclude if args.exclude is not None else sparsity.get("exclude")
    else:
        if args.model_option or args.num_classes is not None:
            raise ConfigError("--model-option and --num-classes need --model")
        return None, args.pattern or "2:4", args.exclude, f"layers read from the file's shapes ({note})"
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        try:
            model = build_model(num_classes=num_classes, **model_cfg)
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as err:
            raise ConfigError(f"{source}: the model cannot be built: {first_line(err)}") from None
    require_same_keys(state, model, "the weights", "--model / --model-option" if args.model else str(config_path))
    return model, pattern, exclude, source


def _export_like(path: Path) -> bool:
    """A YAML mapping with an export config's keys (``model`` and ``num_classes``), whatever their values."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "model" in config and "num_classes" in config


if __name__ == "__main__":
    sys.exit(main())

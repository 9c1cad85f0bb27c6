"""``lbc-check``: is every eligible layer of a weight file N:M? A per-layer table; exit 1 naming the layers that are not.

    lbc-check exported/my_run/model.safetensors                 # an lbc-export: model, pattern, exclusions from its config.yaml
    lbc-check weights.pt --pattern 2:4 --model resnet50         # any state dict of a supported model
    lbc-check weights.pt --pattern 2:4 --model timm/deit_small_patch16_224 --model-option img_size=32
    lbc-check exported/my_lm                                    # an export directory: its model.safetensors

Groups are M consecutive input-channel weights at one output channel and kernel position, as in
training; which layers must be N:M is training's layer selection (stem and classifier dense unless
--exclude says otherwise; a layer whose input dimension M does not divide is not eligible). Without
--model or an export's config.yaml, the layers are read from the file's shapes (2-D and 4-D
``*.weight`` tensors; the first and the last 2-D one kept dense). A language-model export (lbc_export.json
beside the weights) is checked as its training selected: layers from its config.json, GPT-2's Conv1D
weights (stored (in, out)) grouped along their input dimension, a tied lm_head read from its embedding.

Exit status: 0 every eligible layer is N:M; 1 some are not (named on stderr with their broken
groups); 2 bad input (a missing, corrupt, truncated or foreign file, a bad option): one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lbc.cli.summary import parse_model_options
from lbc.errors import ConfigError
from lbc.export import check_weights, format_checks, infer_num_classes, read_export_config, read_weights
from lbc.export.lm import lm_check_inputs, lm_facts_beside
from lbc.models import build_model
from lbc.sparsity.nm import parse_pattern


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
    if Path(args.weights).is_dir():  # an export directory
        args.weights = str(Path(args.weights) / "model.safetensors")
    try:
        state = read_weights(args.weights)
        facts = lm_facts_beside(args.weights) if args.model is None else None
        if facts is not None:
            if args.model_option or args.num_classes is not None:
                raise ConfigError("--model-option and --num-classes need --model")
            state, model, pattern, exclude, source = lm_check_inputs(facts, state, args.pattern, args.exclude)
        else:
            model, pattern, exclude, source = _model_for(args, state)
        pattern = parse_pattern(pattern, key="--pattern")
        checks = check_weights(state, pattern, model, exclude)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
        except ConfigError:  # some other tool's config.yaml: not ours to read
            note = f"no --model; {config_path} is not an lbc export's config"
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
        model = build_model(num_classes=num_classes, **model_cfg)
    return model, pattern, exclude, source


if __name__ == "__main__":
    sys.exit(main())

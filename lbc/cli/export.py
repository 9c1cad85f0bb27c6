"""``lbc-export``: a run's sparse model as plain weights (masks folded in), its config and an N:M report.

    lbc-export outputs/my_run --out exported/my_run            # run dir (its last.pt) or a checkpoint file
    lbc-export outputs/my_run --out exported/my_run --onnx     # also model.onnx (checked with onnxruntime)
    lbc-export outputs/my_run --out exported/my_run --ema      # the EMA weights (trainer.ema=true runs)
    lbc-export outputs/my_run --out exported/my_run --accelerate   # + 2:4 sparse tensor-core timing (CUDA)

Writes DIR/model.safetensors (the model's own state-dict keys: load it with load_state_dict into the
model built from DIR/config.yaml, e.g. lbc.export.load_exported(DIR)), DIR/config.yaml and
DIR/report.json (per layer: pattern, density, N:M or not). config.yaml also says how to feed the model:
`preprocess` (the run's evaluation transform: input size, resize of the short side and interpolation,
centre crop, pixels / divide, mean and std of the 0-1 values, image mode and channel order, NCHW
float32) and `classes` (the class names, when the data has them: digits, or the folder run's train
folders if they are still there); model.onnx carries both as JSON in its metadata (lbc.preprocess,
lbc.classes), which examples/onnx_inference.py reads with onnxruntime alone. Bad input: one line, exit 2.

A language-model run (task=lm) exports a transformers save_pretrained directory instead: DIR/model.safetensors,
config.json, generation_config.json, the tokenizer's files, report.json and lbc_export.json (for lbc-check);
AutoModelForCausalLM.from_pretrained(DIR) loads it without lbc and gives the masked model's logits (checked).
--onnx, --ema and --input-size are not supported there.

A detection run (task=detection: its run directory, or one of its epoch_<n>.pth) exports a plain MMDetection
checkpoint: DIR/model.pth (the detector's own state-dict keys, masks folded in, meta with the config and the
classes), DIR/config.py (the run's config with lbc taken out), report.json and lbc_export.json (for lbc-check);
mmdet's init_detector(DIR/config.py, DIR/model.pth) loads it without lbc and gives the masked model's
predictions (checked). --onnx, --ema and --input-size are not supported there.

--out must be a new or empty directory or an earlier export's: a run directory (last.pt, metrics.jsonl,
.lock, .hydra, last_checkpoint, a run's config.yaml) or a directory holding other files is refused before
anything is read. A write the storage refuses (disk full, read-only, no permission): one line, exit 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lbc.errors import ConfigError, WriteError
from lbc.export import ONNX_OPSET, export_run, format_checks, report_json
from lbc.io import atomic_write


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line), export, print the per-layer table; the exit status."""
    parser = argparse.ArgumentParser(prog="lbc-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory (its last.pt) or a checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the export into")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights the run kept (trainer.ema=true)")
    parser.add_argument("--onnx", action="store_true", help="also write DIR/model.onnx (dynamic batch), "
                        "checked against PyTorch with onnxruntime")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help=f"ONNX opset (default {ONNX_OPSET})")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                        help="input size for the checks and ONNX (default: the run's data.input_size)")
    parser.add_argument("--accelerate", action="store_true", help="on a GPU with sparse tensor cores: time the "
                        "export dense vs 2:4 (lbc.accelerate) and add it to report.json; elsewhere say why not")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the --accelerate timing (default 64)")
    parser.add_argument("--quiet", action="store_true", help="no per-layer table")
    args = parser.parse_args(argv)
    say = (lambda line: None) if args.quiet else (lambda line: print(f"lbc-export: {line}", flush=True))
    try:
        if args.opset < 7:
            raise ConfigError(f"--opset {args.opset}: use 7 or newer (default {ONNX_OPSET})")
        if args.batch < 1:
            raise ConfigError(f"--batch {args.batch}: use a positive integer")
        if args.input_size is not None and min(args.input_size) < 1:
            raise ConfigError(f"--input-size {args.input_size}: use positive sizes")
        folded, report = export_run(args.source, args.out, ema=args.ema, onnx=args.onnx, opset=args.opset,
                            input_size=args.input_size, say=say)
    except WriteError as err:  # disk full, read-only, no permission: a runtime failure, the earlier files intact
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_checks(folded.layers, folded.pattern))
    if report.get("task") in PLAIN_EXPORTS:
        return _plain_done(args, report)
    params = sum(v.numel() for k, v in folded.state.items() if k.endswith(".weight") and v.dim() in (2, 4))
    nonzero = sum(int((v != 0).sum()) for k, v in folded.state.items() if k.endswith(".weight") and v.dim() in (2, 4))
    nm = "exactly" if report["exact_nm"] else ("at most N of M" if report["nm"] else "NOT")
    checked = (f"outputs equal the masked model's (max |diff| {report['max_abs_diff']:.3g})"
               if report["max_abs_diff"] is not None else "outputs not checked (no input size)")
    onnx = (f", model.onnx (onnxruntime max |diff| {report['onnx']['onnxruntime_max_abs_diff']:.3g})"
            if "onnx" in report else "")
    described = ", ".join(k for k in ("preprocess", "classes") if k in folded.config)
    print(f"exported {report['model']} ({report['method']} {report['pattern']}, epoch {report['epoch']}, "
          f"{report['weights']} weights) to {args.out}: model.safetensors, "
          f"config.yaml{f' (with {described})' if described else ''}, report.json{onnx}; "
          f"{report['nm_layers']} layers {nm} {report['pattern']}, conv/linear weights {nonzero}/{params} non-zero; "
          f"{checked}")
    if args.accelerate:
        report["acceleration"] = accelerate_and_time(args.out, folded.config.get("input_size"), args.batch)
        atomic_write(Path(args.out) / "report.json", lambda p: p.write_text(report_json(report)))
    return 0


# The closing line of an export that needs no lbc code to load, per task: where the run stood (its record's key),
# which weights are counted, what was compared, and why --accelerate does not time it.
PLAIN_EXPORTS: dict[str, tuple[str, str, str, str]] = {
    "lm": ("step", "linear weights", "from_pretrained's logits equal the masked model's",
           "task=lm: --accelerate times image models from config.yaml; a transformers export is not timed"),
    "detection": ("epoch", "conv/linear weights", "the plain mmdet model's outputs equal the masked model's",
                  "task=detection: --accelerate times image classifiers from config.yaml; a detector is not timed"),
}


def _plain_done(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """The closing line of a language-model or detection export (and --accelerate's reason for not running)."""
    from lbc.export.lm import linear_weights

    position, weights, compared, why = PLAIN_EXPORTS[report["task"]]
    nonzero, params = linear_weights(report)
    nm = "exactly" if report["exact_nm"] else ("at most N of M" if report["nm"] else "NOT")
    print(f"exported {report['model']} ({report['method']} {report['pattern']}, {position} {report[position]}) to "
          f"{args.out}: {', '.join(report['files'])}; {report['nm_layers']} layers {nm} {report['pattern']}, "
          f"{weights} {nonzero}/{params} non-zero; {compared} (max |diff| {report['max_abs_diff']:.3g})")
    if args.accelerate:
        print(f"accelerate: not run: {why}")
        report["acceleration"] = {"converted": 0, "reason": why}
        atomic_write(Path(args.out) / "report.json", lambda p: p.write_text(report_json(report)))
    return 0


def accelerate_and_time(out: str, input_size: list[int] | None, batch: int) -> dict[str, Any]:
    """Load the export on the GPU in fp16, dense vs ``lbc.accelerate``d: outputs and latency; the reason if it cannot."""
    import copy

    import torch

    from lbc.accelerate import accelerate, compare_latency, hardware_reason, latency_ms
    from lbc.export import load_exported

    why = hardware_reason()
    if why is None and not input_size:
        why = "the input size is unknown: pass --input-size C H W"
    if why is not None:
        print(f"accelerate: not run: {why}")
        return {"converted": 0, "reason": why}
    dense = load_exported(out, device="cuda").half()
    sparse = copy.deepcopy(dense)
    result = accelerate(sparse, quiet=True)
    if not result:
        print(f"accelerate: not run: {result.reason}")
        return {"converted": 0, "reason": result.reason}
    x = torch.randn(batch, *input_size, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        diff = float((sparse(x).float() - dense(x).float()).abs().max())
    ms = compare_latency({"dense": lambda: latency_ms(dense, x), "sparse": lambda: latency_ms(sparse, x)})
    line = {"device": torch.cuda.get_device_name(), "dtype": "float16", "batch": batch, "backend": result.backend,
            "converted": len(result.converted), "dense_ms": ms["dense"], "sparse_ms": ms["sparse"],
            "ratio": ms["sparse"] / ms["dense"], "max_abs_diff": diff}
    print(f"accelerate: {line['device']}, float16, batch {batch}: {len(result.converted)} layers 2:4 "
          f"({result.backend}); dense {ms['dense']:.2f} ms, sparse {ms['sparse']:.2f} ms, "
          f"ratio {line['ratio']:.3f} (sparse/dense); max |diff| {diff:.3g}")
    return line


if __name__ == "__main__":
    sys.exit(main())

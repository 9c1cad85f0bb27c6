#!/usr/bin/env python
"""Inference latency and throughput: dense vs 2:4 exported (vs 2:4 on sparse tensor cores), one run.

    python benchmarks/inference.py                     # CPU: torch fp32 and onnxruntime, batch 1 and 8
    python benchmarks/inference.py --device cuda       # GPU: fp16, torch dense / exported / lbc.accelerate, batch 1-256

For each model (ResNet-50 and DeiT-Small, random init: nothing downloads) the *dense* model and its
*exported* 2:4 version (ASP's one-shot magnitude prune of the layers training would select, masks
folded into plain weights, as lbc-export leaves them) run the same input; *accelerated* is the
exported model after ``lbc.accelerate`` (cuSPARSELt/CUTLASS 2:4 kernels; CUDA with compute capability
>= 8.0 only, else one line says why). ``onnxruntime`` runs both ONNX exports on the CPU. Variants are
measured round-robin (one forward of each in turn) and the median is reported; ``ratio`` is
variant ms / dense ms of the same backend and batch (< 1: faster). Each row prints as it is measured;
``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lbc
from lbc.accelerate import accelerate, compare_latency, hardware_reason, latency_ms
from lbc.models import build_model

MODELS = ("resnet50", "deit_small_patch16_224")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_models(name: str, image_size: int) -> tuple[nn.Module, nn.Module, int]:
    """(dense, exported 2:4, layers made 2:4): the same random weights, the second pruned and folded."""
    torch.manual_seed(0)
    options = {"img_size": image_size} if name.startswith("deit") else {}
    dense = build_model(name, num_classes=1000, **options).eval()
    exported = copy.deepcopy(dense)
    sp = lbc.sparsify(exported, method="asp", pattern="2:4", dense_epochs=0)  # training's layer selection
    sp.update(0)  # the one-shot prune
    layers = len(sp.layers)
    sp.detach()  # masks folded into plain weights: what lbc-export writes
    return dense, exported.eval(), layers


def torch_rows(name: str, dense: nn.Module, exported: nn.Module, args: argparse.Namespace,
               device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Dense, exported and (where it can run) accelerated torch models at each batch size."""
    fmt = torch.channels_last if device.type == "cuda" and name.startswith("resnet") else torch.preserve_format
    models = {"dense": dense.to(device, dtype, memory_format=fmt), "exported": exported.to(device, dtype, memory_format=fmt)}
    accel_note = hardware_reason(device)
    if accel_note is None:
        sparse = copy.deepcopy(models["exported"])
        result = accelerate(sparse, quiet=True)
        if result:
            models["accelerated"] = sparse
            accel_note = f"{len(result.converted)} layers 2:4 ({result.backend})"
        else:
            accel_note = result.reason
    print(f"# {name} on torch/{device.type}: accelerated: {accel_note}", flush=True)
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, args.image_size, args.image_size, device=device, dtype=dtype).to(memory_format=fmt)
        check = ""
        if "accelerated" in models:
            with torch.inference_mode():
                diff = float((models["accelerated"](x).float() - models["exported"](x).float()).abs().max())
            check = f"{diff:.3g}"
        try:
            ms = compare_latency({k: (lambda m=m, x=x: latency_ms(m, x)) for k, m in models.items()},
                                 iters=args.iters, warmup=args.warmup)
        except torch.OutOfMemoryError:
            print(f"# {name} batch {batch}: out of memory, larger batches skipped", flush=True)
            torch.cuda.empty_cache()
            break
        rows.append(row(name, "torch", device, dtype, batch, ms, check))
    return rows


def ort_rows(name: str, dense: nn.Module, exported: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Dense and exported models as ONNX files run by onnxruntime's CPU provider."""
    import onnxruntime as ort

    from lbc.export import export_onnx

    sessions = {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in (("dense", dense), ("exported", exported)):
            print(f"# {name}: exporting the {key} model to ONNX ...", flush=True)
            path = Path(tmp) / f"{key}.onnx"
            export_onnx(model.float().cpu().eval(), (3, args.image_size, args.image_size), path, check=False)
            sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in args.ort_batch_sizes:
        x = {"input": torch.randn(batch, 3, args.image_size, args.image_size).numpy()}

        def run(session: Any, x: dict = x) -> float:
            import time

            t0 = time.perf_counter()
            session.run(None, x)
            return (time.perf_counter() - t0) * 1e3

        ms = compare_latency({k: (lambda s=s: run(s)) for k, s in sessions.items()}, iters=args.iters, warmup=args.warmup)
        rows.append(row(name, "onnxruntime", torch.device("cpu"), torch.float32, batch, ms, ""))
    return rows


def row(name: str, backend: str, device: torch.device, dtype: torch.dtype, batch: int, ms: dict[str, float],
        check: str) -> dict[str, Any]:
    """One result line: printed now, returned for --json."""
    out: dict[str, Any] = {"model": name, "backend": backend, "device": device_name(device),
                           "dtype": str(dtype).removeprefix("torch."), "batch": batch}
    for key, value in ms.items():
        out[f"{key}_ms"] = value
        out[f"{key}_img_s"] = batch / value * 1e3
        if key != "dense":
            out[f"{key}_ratio"] = value / ms["dense"]
    if check:
        out["accelerated_max_abs_diff"] = float(check)
    cells = [f"{name:<24}", f"{backend:<11}", f"{out['device'][:28]:<28}", f"{out['dtype']:<8}", f"{batch:>5}",
             f"{ms['dense']:>9.2f}", f"{ms['exported']:>9.2f}", f"{out['exported_ratio']:>6.3f}"]
    if "accelerated" in ms:
        cells += [f"{ms['accelerated']:>9.2f}", f"{out['accelerated_ratio']:>6.3f}"]
    else:
        cells += [f"{'-':>9}", f"{'-':>6}"]
    cells += [f"{out['dense_img_s']:>9.1f}", f"{out['exported_img_s']:>9.1f}",
              f"{out.get('accelerated_img_s', 0):>9.1f}" if "accelerated" in ms else f"{'-':>9}"]
    print("  ".join(cells), flush=True)
    return out


HEADER = "  ".join([f"{'model':<24}", f"{'backend':<11}", f"{'device':<28}", f"{'dtype':<8}", f"{'batch':>5}",
                    f"{'dense ms':>9}", f"{'2:4 ms':>9}", f"{'ratio':>6}", f"{'accel ms':>9}", f"{'ratio':>6}",
                    f"{'dense/s':>9}", f"{'2:4/s':>9}", f"{'accel/s':>9}"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="torch batch sizes (default: CPU 1 8; CUDA 1 16 64 256)")
    parser.add_argument("--ort-batch-sizes", type=int, nargs="*", default=[1, 8],
                        help="onnxruntime (CPU) batch sizes; none: skip onnxruntime")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=None, help="timed rounds (default: CPU 5, CUDA 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: CPU 1, CUDA 10)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and onnxruntime)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    cuda = device.type == "cuda"
    args.batch_sizes = args.batch_sizes or ([1, 16, 64, 256] if cuda else [1, 8])
    args.iters = args.iters or (50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = cuda
    print(f"# torch {torch.__version__}, device {device_name(device)}, dtype {str(dtype).removeprefix('torch.')}, "
          f"{args.image_size}x{args.image_size}, median of {args.iters} rounds after {args.warmup}; "
          f"ratio = variant ms / dense ms", flush=True)
    print(f"# 2:4 sparse tensor cores: {hardware_reason(device) or 'available'}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for name in args.models:
        dense, exported, layers = make_models(name, args.image_size)
        print(f"# {name}: {layers} layers pruned to 2:4 (stem and classifier dense)", flush=True)
        if args.ort_batch_sizes:
            rows += ort_rows(name, dense, exported, args)
        rows += torch_rows(name, dense, exported, args, device, dtype)
        del dense, exported
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

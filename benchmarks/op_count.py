#!/usr/bin/env python
"""aten ops one training step dispatches, each sparsity method against dense: a proxy for GPU launch overhead.

    python benchmarks/op_count.py                         # ResNet-18 (100 classes), batch 2 x 32x32, CPU
    python benchmarks/op_count.py --device cuda           # the same on a GPU
    python benchmarks/op_count.py --variants dense srste --top 12

A step is :func:`step_time.make_step`'s (``sp.update(epoch)``, ``zero_grad``, forward, loss, backward,
the trainer's fused SGD), counted after two warm-up steps. Every aten op that reaches the dispatcher
below autograd (a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees forward and backward,
after composite ops have decomposed) is one count, except :data:`NO_KERNEL`: views and other ops that
only make a new tensor header and launch no kernel on a GPU. An op inside another op's kernel is not
seen, so a count is one launch or more (a cuDNN convolution may launch several). Counts do not depend
on the batch size or the machine's load: the defaults are small so that all variants take seconds.

"extra / layer" divides a variant's ops beyond dense by the layers the method masks (``len(sp.layers)``):
the per-layer cost that launch overhead multiplies on a GPU. The top ops are those with the most
extra calls against dense. With ``--json`` the last line is the JSON of every figure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from step_time import VARIANTS, checked_device, checked_variants, make_step, parse_setting
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only describe existing memory (views, aliases, metadata), only allocate, or only mark a profiler
# range: no kernel on a GPU. (reshape and flatten decompose into views, or a copy that is counted.)
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "unbind", "select", "slice", "as_strided", "detach",
    "alias", "unflatten", "movedim", "permute", "reshape", "squeeze", "unsqueeze", "split", "split_with_sizes",
    "chunk", "narrow", "view_as", "expand_as", "flatten", "lift_fresh", "_reshape_alias", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided",
    "_record_function_enter_new", "_record_function_exit",  # the optimizer's profiler markers
})  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (``aten.add``, overloads folded), those in :data:`NO_KERNEL` apart."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.no_kernel: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = func.overloadpacket.__name__
        (self.no_kernel if name in NO_KERNEL else self.ops)[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_step(step: Callable[[], None], warmup: int = 2) -> OpCounter:
    """The ops of one call of ``step`` after ``warmup`` uncounted calls."""
    for _ in range(warmup):
        step()
    with OpCounter() as counter:
        step()
    return counter


def masked_layers(step: Callable[[], None]) -> int:
    """Layers the step's method masks (``len(sp.layers)``), read from :func:`make_step`'s closure."""
    sp = inspect.getclosurevars(step).nonlocals["sp"]
    return len(sp.layers) if sp.masks_weights else 0


def extra_ops(counts: Counter[str], dense: Counter[str]) -> dict[str, int]:
    """Per op name, calls beyond dense (only the positive differences), most first."""
    extra = {op: counts[op] - dense.get(op, 0) for op in counts}
    return dict(sorted(((op, n) for op, n in extra.items() if n > 0), key=lambda kv: (-kv[1], kv[0])))


def count_variants(variants: list[str], batch: int, size: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Every variant's ops per step (total, by op, views apart) and its masked layers; dense first."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        step = make_step(v, batch, size, device)
        counter = count_step(step)
        out[v] = {"ops": sum(counter.ops.values()), "by_op": dict(counter.ops),
                  "no_kernel_ops": sum(counter.no_kernel.values()), "layers": masked_layers(step)}
        del step
    return out


def summarise(counts: dict[str, dict[str, Any]], top: int) -> dict[str, dict[str, Any]]:
    """Per variant: ops, ops minus dense, extra ops per masked layer and the ``top`` ops by extra count."""
    dense = Counter(counts["dense"]["by_op"])
    rows: dict[str, dict[str, Any]] = {}
    for v, c in counts.items():
        extra = c["ops"] - counts["dense"]["ops"]
        by_op = extra_ops(Counter(c["by_op"]), dense)
        rows[v] = {"ops": c["ops"], "extra": extra, "layers": c["layers"],
                   "extra_per_layer": extra / c["layers"] if c["layers"] else None,
                   "no_kernel_ops": c["no_kernel_ops"], "top_extra": dict(list(by_op.items())[:top]),
                   "by_op": c["by_op"]}
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"from {', '.join(VARIANTS)} (dense is always counted)")
    parser.add_argument("--size", default="2x32", help="BATCHxSIDE of the input (counts do not depend on it)")
    parser.add_argument("--top", type=int, default=8, help="ops listed per variant, by extra count vs dense")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line, last")
    args = parser.parse_args(argv)
    args.variants = checked_variants(parser, args.variants)
    args.batch, args.side = parse_setting(parser, "--size", args.size)
    args.device = checked_device(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    rows = summarise(count_variants(args.variants, args.batch, args.side, device), args.top)
    print(f"# ResNet-18 (100 classes), batch {args.batch} x {args.side}x{args.side}, device {device}, "
          f"torch {torch.__version__}; aten ops of one training step after 2 warm-up steps, "
          f"views and allocations ({len(NO_KERNEL)} op names) not counted")
    print("\n| variant | ops/step | - dense | layers | extra / layer | top extra ops vs dense |\n|---|---:|---:|---:|---:|---|")
    for v, r in rows.items():
        per_layer = "-" if r["extra_per_layer"] is None else f"{r['extra_per_layer']:.1f}"
        top = ", ".join(f"{op.removeprefix('aten.')} +{n}" for op, n in r["top_extra"].items()) or "-"
        print(f"| {v} | {r['ops']} | {r['extra']:+d} | {r['layers']} | {per_layer} | {top} |")
    result = {"model": "resnet18", "batch": args.batch, "side": args.side, "device": str(device),
              "torch": torch.__version__, "no_kernel": sorted(NO_KERNEL), "variants": rows}
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Training-step time of each sparsity method over the dense step, same model and batch, one run.

    python benchmarks/step_time.py                       # CPU: ResNet-18 at 16x224x224 and 64x32x32
    python benchmarks/step_time.py --device cuda --steps 50
    python benchmarks/step_time.py --profile --sizes 64x32 --variants lbc_removing_late   # where the time goes

Methods are measured round-robin (one step of each in turn), so drift of the machine hits all of
them alike; the figure is the median step time over ``--steps`` rounds, as a ratio to dense. The
load average is printed before and after: a figure taken at a load above 0.5 is not a quiet one.
Also times one LBC schedule update (a removal of candidates) on ResNet-50, as a share of one dense
ResNet-50 training step (batch 32, 224 px) on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import lbc
from lbc.engine.optim import build_optimizer, param_groups
from lbc.sparsity import METHODS

# name -> (sparsify options, epoch to put the method at before timing). LBC's scores are random
# (as after some training), so each group keeps its own candidates.
VARIANTS: dict[str, tuple[dict, float]] = {
    "dense": ({"method": "dense"}, 0),
    # scores learning; for 2:4 at epoch 1 (2 of 6 candidates gone) every group still keeps all 4 weights
    "lbc_removing": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10}, 1),
    # scores learning, 2 of 6 candidates left: the masks keep 3 or 4 of every 4 weights
    "lbc_removing_late": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10}, 3),
    "lbc_after_t_f": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10}, 10),  # one candidate left
    # the authors' selection: the alive set re-chosen by signed-score top-k before every step
    "lbc_released_removing": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10, "removal": "released"}, 1),
    "lbc_released_after_t_f": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10, "removal": "released"}, 10),
    "srste": ({"method": "srste", "pattern": "2:4"}, 0),
    "asp_finetune": ({"method": "asp", "pattern": "2:4", "dense_epochs": 0, "finetune_epochs": 1}, 0),
}


def checked_variants(parser: argparse.ArgumentParser, names: list[str]) -> list[str]:
    """``names`` with dense first (always measured) and no repeats; a one-line usage error for an unknown one."""
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return ["dense", *dict.fromkeys(v for v in names if v != "dense")]


def parse_setting(parser: argparse.ArgumentParser, flag: str, text: str, min_batch: int = 1) -> tuple[int, int]:
    """``BATCHxSIDE`` as (batch, side); a one-line usage error unless batch >= ``min_batch`` and side >= 32."""
    try:
        batch, side = (int(v) for v in text.split("x"))
    except ValueError:
        parser.error(f"{flag} {text!r}: use BATCHxSIDE, e.g. 16x32")
    if batch < min_batch or side < 32:
        parser.error(f"{flag} {text}: use a batch >= {min_batch} and a side >= 32 (ResNet-18 downsamples 32x)")
    return batch, side


def checked_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a device; a one-line usage error for cuda where torch sees no GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: torch sees no GPU here")
    return device


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(variant: str, batch: int, size: int, device: torch.device) -> Callable[[], None]:
    """One SGD training step (forward, loss, backward, optimizer) of ResNet-18 with ``variant``.

    The optimizer and its parameter groups are built as the trainer builds them.
    """
    options, epoch = VARIANTS[variant]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(device)
    sp = lbc.sparsify(model, **options)
    with torch.no_grad():
        for scores in sp.score_parameters():
            scores.normal_(generator=torch.Generator(device).manual_seed(1))
    sp.update(epoch)
    groups = param_groups(model, sp, 5e-4)
    opt = build_optimizer("sgd", groups, lr=0.01, weight_decay=5e-4, momentum=0.9)  # as the trainer does
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        sp.update(epoch)  # what the trainer does every step: must cost nothing when nothing changes
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def time_steps(variants: list[str], batch: int, size: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each variant, measured round-robin."""
    fns = {v: make_step(v, batch, size, device) for v in variants}
    for fn in fns.values():  # warm-up: allocator, caches, lazy init
        fn()
        fn()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def time_schedule_update(device: torch.device, repeats: int = 3) -> float:
    """Median seconds for one LBC 2:4 removal (Eq. 6 count, ranking of scores, Eq. 8 masks) on ResNet-50.

    Each repeat starts from every candidate alive (the buffers restored) and removes epoch 1's count.
    """
    model = torchvision.models.resnet50().to(device)
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_i=0, t_f=10)
    states = [m.parametrizations.weight[0] for m in sp.layers.values()]
    with torch.no_grad():
        for s in sp.score_parameters():
            s.normal_()
    times = []
    for _ in range(repeats):
        with torch.no_grad():
            for state in states:
                state.alive.fill_(True)
                state.mask.fill_(True)
        sp.removed = 0
        _sync(device)
        start = time.perf_counter()
        sp.update(1)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_dense_resnet50_step(device: torch.device, batch: int = 32, size: int = 224, steps: int = 3) -> float:
    """Median seconds of one dense ResNet-50 SGD training step (the yardstick of the LBC update)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for step in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        _sync(device)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_variants(variants: list[str], batch: int, size: int, steps: int, device: torch.device) -> None:
    """Where the time goes: ms per step of each op (self time, ``torch.profiler``), each variant beside dense."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    for variant in variants:
        fn = make_step(variant, batch, size, device)
        fn()
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        for event in prof.key_averages():
            per_op.setdefault(event.key, {})[variant] = event.self_cpu_time_total / 1e3 / steps
    totals = {v: sum(ops.get(v, 0.0) for ops in per_op.values()) for v in variants}
    base = variants[0]
    rows = sorted(per_op.items(), key=lambda kv: -max(abs(kv[1].get(v, 0.0) - kv[1].get(base, 0.0)) for v in variants))
    print(f"\nms per step by op (self CPU time, the mean of {steps} profiled steps), batch {batch} x {size}")
    print(f"{'op':<44}" + "".join(f"{v:>24}" for v in variants))
    print(f"{'total':<44}" + "".join(f"{totals[v]:>24.1f}" for v in variants))
    for op, times in rows[:14]:
        print(f"{op[:43]:<44}" + "".join(f"{times.get(v, 0.0):>24.1f}" for v in variants))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds per setting (the median is reported)")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--sizes", nargs="*", default=["16x224", "64x32"], help="BATCHxSIDE settings")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: each variant's ms per step by op beside dense (torch.profiler)")
    parser.add_argument("--resnet50-steps", type=int, default=3,
                        help="dense ResNet-50 steps (batch 32, 224 px) timed as the LBC update's yardstick; 0: skip")
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    variants = checked_variants(parser, args.variants or [v for v, (o, _) in VARIANTS.items() if o["method"] in METHODS])
    settings = [parse_setting(parser, "--sizes", setting) for setting in args.sizes]
    if args.profile:
        print(f"load {load_average()}")
        for batch, size in settings:
            profile_variants(variants, batch, size, min(args.steps, 5), device)
        return
    result: dict = {"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
                    "load_before": load_average()}
    print(f"device={device} threads={torch.get_num_threads()} median of {args.steps} round-robin steps, "
          f"load {result['load_before']}")
    for batch, size in settings:
        setting = f"{batch}x{size}"
        seconds = time_steps(variants, batch, size, args.steps, device)
        print(f"\nResNet-18, batch {batch} x {size}x{size} (load {load_average()})")
        print(f"{'variant':<24} {'ms/step':>10} {'x dense':>8}")
        for v, s in seconds.items():
            print(f"{v:<24} {s * 1e3:>10.1f} {s / seconds['dense']:>8.3f}")
        result[setting] = {v: {"ms": s * 1e3, "ratio": s / seconds["dense"]} for v, s in seconds.items()}
    update = time_schedule_update(device)
    print(f"\nOne LBC 2:4 schedule update on ResNet-50: {update * 1e3:.1f} ms")
    result["lbc_update_resnet50_ms"] = update * 1e3
    if args.resnet50_steps > 0:
        dense_step = time_dense_resnet50_step(device, steps=args.resnet50_steps)
        result["dense_resnet50_step_ms"] = dense_step * 1e3
        result["lbc_update_share_of_resnet50_step"] = update / dense_step
        print(f"One dense ResNet-50 training step (batch 32, 224 px): {dense_step * 1e3:.0f} ms; "
              f"the update is {100 * update / dense_step:.2f}% of it")
    result["load_after"] = load_average()
    print(f"load after: {result['load_after']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

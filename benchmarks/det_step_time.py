#!/usr/bin/env python
"""Training-step time of Faster R-CNN R50-FPN with each sparsity method over the dense step, one run.

    python benchmarks/det_step_time.py                        # CPU: 2 images of 320x320, 15 rounds
    python benchmarks/det_step_time.py --device cuda --steps 30 --size 800 --batch 2

The detector is mmdet's shipped config (``--config``, relative to mmdet's configs) built as users run
it: ``SparseDetector`` (sparse backbone without its stem, the rest dense; backbone ``init_cfg`` None:
nothing downloads), the optimizer from ``SparsityOptimWrapperConstructor`` (SGD as in the config),
and a step is what mmengine's loop does: ``sp.update(epoch)`` (SparsityHook, before every iteration)
then ``train_step`` (preprocess, forward with losses, backward, SGD step). The batch is fixed and
synthetic (``--batch`` images of ``--size`` pixels with a few boxes each).

Variants are measured round-robin (one step of each in turn), so drift of the machine hits all of
them alike; the figure is the median over ``--steps`` rounds, as a ratio to dense from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# mmdet, mmengine and lbc.detection are imported where they are used: ``--help`` works without them.

# name -> (SparseDetector's sparsity dict, epoch the method is put at and updated to every step)
VARIANTS: dict[str, tuple[dict[str, Any] | None, float]] = {
    "dense": (None, 0),
    "lbc_removing": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 100}, 1),  # scores learning
    "lbc_after_t_f": ({"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 10}, 10),  # one candidate left
    "srste": ({"method": "srste", "pattern": "2:4"}, 0),
    "asp_finetune": ({"method": "asp", "pattern": "2:4", "dense_epochs": 0}, 0),
}
DEFAULT_VARIANTS = ["dense", "lbc_removing", "lbc_after_t_f", "srste", "asp_finetune"]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, size: int, boxes: int = 3, seed: int = 0) -> dict[str, Any]:
    """``batch`` random ``size`` x ``size`` images with ``boxes`` random boxes each, as mmdet's loader yields them."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        xy = torch.rand(boxes, 2, generator=g) * size * 0.6
        wh = torch.rand(boxes, 2, generator=g) * size * 0.35 + size * 0.05
        sample = DetDataSample(metainfo={"img_shape": (size, size), "ori_shape": (size, size),
                                         "scale_factor": (1.0, 1.0), "img_id": len(samples)})
        sample.gt_instances = InstanceData(bboxes=torch.cat([xy, xy + wh], 1),
                                           labels=torch.randint(0, 80, (boxes,), generator=g))
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def build(variant: str, config: str, device: torch.device) -> tuple[Any, Any, Any]:
    """(SparseDetector, its method, optimizer wrapper) for ``variant``, put at its epoch."""
    import mmdet
    from mmdet.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS
    from mmengine.config import Config

    import lbc.detection.plugin  # noqa: F401  (registers SparseDetector and SparsityOptimWrapperConstructor)

    sparsity, epoch = VARIANTS[variant]
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / config))
    detector = cfg.model  # a ConfigDict: mmdet's detectors read train_cfg.rpn as attributes
    detector.backbone.init_cfg = None  # mmdet's torchvision://resnet50 would download
    torch.manual_seed(0)
    model = MODELS.build({"type": "SparseDetector", "detector": detector, "sparsity": sparsity}).to(device)
    model.init_weights()
    model.train()
    sp = model.sparsity
    sp.update(epoch)
    optim = cfg.optim_wrapper.to_dict()
    optim.pop("constructor", None)
    paramwise = optim.pop("paramwise_cfg", None)
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build({"type": "SparsityOptimWrapperConstructor",
                                                    "optim_wrapper_cfg": optim, "paramwise_cfg": paramwise})
    return model, sp, constructor(model)


def make_step(variant: str, config: str, data: dict[str, Any], device: torch.device) -> Callable[[], None]:
    """One training iteration as mmengine runs it: the hook's ``sp.update(epoch)``, then ``train_step``."""
    model, sp, wrapper = build(variant, config, device)
    epoch = VARIANTS[variant][1]

    def step() -> None:
        sp.update(epoch)  # before every iteration: must cost nothing when nothing changes
        model.train_step(data, wrapper)

    return step


def time_steps(variants: list[str], config: str, data: dict[str, Any], steps: int,
               device: torch.device) -> dict[str, dict[str, float]]:
    """Median wall seconds and least process-CPU seconds per step of each variant, round-robin after two
    warm-up steps each.

    The CPU figure (all threads of this process, the least of the rounds) is the steadier one on a
    shared machine: waiting for a core another process holds is not counted, and a busy neighbour
    only ever adds to it.
    """
    fns = {v: make_step(v, config, data, device) for v in variants}
    for fn in fns.values():  # warm-up: allocator, caches, the first forward's MAC measurement
        fn()
        fn()
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v, fn in fns.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[v].append(time.perf_counter() - start)
            cpu[v].append(time.process_time() - start_cpu)
    return {v: {"wall": statistics.median(wall[v]), "cpu": min(cpu[v])} for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=15, help="timed rounds (the median is reported)")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--size", type=int, default=320, help="image side in pixels")
    parser.add_argument("--config", default="faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
                        help="mmdet config, relative to mmdet's shipped configs")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {list(VARIANTS)}")
    args = parser.parse_args()
    from mmdet.utils import register_all_modules
    from mmengine.logging import MMLogger

    register_all_modules()
    MMLogger.get_instance("det_step_time", log_level="WARNING")  # the current logger: no per-layer init lines
    device = torch.device(args.device)
    variants = args.variants or DEFAULT_VARIANTS
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if "dense" not in variants:
        variants = ["dense", *variants]
    data = synthetic_batch(args.batch, args.size)
    load_before = _load()
    seconds = time_steps(variants, args.config, data, args.steps, device)
    load_after = _load()
    dense = seconds["dense"]
    print(f"device={device} threads={torch.get_num_threads()} median of {args.steps} round-robin steps, "
          f"load before {load_before}, after {load_after}")
    print(f"{args.config}, batch {args.batch} x {args.size}x{args.size}")
    print(f"{'variant':<16} {'ms/step':>10} {'x dense':>8} {'cpu min ms':>11} {'x dense':>8}")
    for v, s in seconds.items():
        print(f"{v:<16} {s['wall'] * 1e3:>10.1f} {s['wall'] / dense['wall']:>8.3f} "
              f"{s['cpu'] * 1e3:>11.1f} {s['cpu'] / dense['cpu']:>8.3f}")
    result = {"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps, "batch": args.batch,
              "size": args.size, "config": args.config, "load_before": load_before, "load_after": load_after,
              "variants": {v: {"ms": s["wall"] * 1e3, "ratio": s["wall"] / dense["wall"], "cpu_min_ms": s["cpu"] * 1e3,
                               "cpu_ratio": s["cpu"] / dense["cpu"]} for v, s in seconds.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

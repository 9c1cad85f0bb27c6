"""Small MMDetection configs for tests: mmdet's shipped Faster / Mask R-CNN files with a ResNet-18, shrunk heads,
three classes and the generated shapes set (``lbc.detection.shapes``). Only the values that make them small and
fast on a CPU are overridden; everything else is mmdet's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mmdet
from mmengine.config import Config

CONFIGS = Path(mmdet.__file__).parent / ".mim" / "configs"
SHIPPED = {
    "faster": CONFIGS / "faster_rcnn" / "faster-rcnn_r50_fpn_1x_coco.py",
    "mask": CONFIGS / "mask_rcnn" / "mask-rcnn_r50_fpn_1x_coco.py",
}
CLASSES = ("circle", "square", "triangle")
WIDTH = 64  # FPN channels


def small_detector(kind: str) -> dict[str, Any]:
    """Overrides that turn mmdet's R50-FPN detector into a ResNet-18 one with shrunk heads (merged into the base)."""
    detector: dict[str, Any] = {
        "backbone": {"depth": 18, "init_cfg": None, "frozen_stages": -1, "norm_eval": False},
        "neck": {"in_channels": [64, 128, 256, 512], "out_channels": WIDTH},
        "rpn_head": {"in_channels": WIDTH, "feat_channels": WIDTH},
        "roi_head": {
            "bbox_roi_extractor": {"out_channels": WIDTH},
            "bbox_head": {"in_channels": WIDTH, "fc_out_channels": 256, "num_classes": len(CLASSES)},
        },
        "train_cfg": {
            "rpn": {"sampler": {"num": 128}},
            "rpn_proposal": {"nms_pre": 600, "max_per_img": 300},
            "rcnn": {"sampler": {"num": 64, "pos_fraction": 0.5}},  # more positives per RoI batch: faster learning
        },
        "test_cfg": {"rpn": {"nms_pre": 300, "max_per_img": 100}},
    }
    if kind == "mask":
        detector["roi_head"]["mask_roi_extractor"] = {"out_channels": WIDTH}
        detector["roi_head"]["mask_head"] = {"in_channels": WIDTH, "conv_out_channels": WIDTH,
                                             "num_classes": len(CLASSES)}
    return detector


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def detection_config(
    kind: str,
    data_root: Path,
    work_dir: Path,
    sparsity: dict[str, Any] | None = None,
    epochs: int = 2,
    batch_size: int = 4,
    image_size: int = 96,
    lr: float = 0.02,
    warmup_iters: int = 20,
    checkpoint_interval: int | None = None,
    seed: int = 0,
    log_interval: int = 10,
    val_interval: int = 1,
    optimizer: dict[str, Any] | None = None,
    anchor_scale: int = 4,
) -> Config:
    """mmdet's shipped ``kind`` (faster | mask) config as a small SparseDetector run on the shapes set at ``data_root``.

    ``optimizer``: mmengine's optimizer config (default SGD, ``lr``, momentum 0.9, weight decay 1e-4);
    ``anchor_scale``: the RPN's anchor scale (mmdet: 8, for 800 px images; 4 suits objects of 10-30 px).
    """
    cfg = Config.fromfile(str(SHIPPED[kind]))
    base_model = cfg.model.to_dict()
    detector = _merge(base_model, small_detector(kind))
    detector["rpn_head"]["anchor_generator"]["scales"] = [anchor_scale]
    cfg.model = {"type": "SparseDetector", "detector": detector, "sparsity": sparsity}
    cfg.custom_imports = {"imports": ["lbc.detection.plugin"], "allow_failed_imports": False}
    cfg.custom_hooks = [{"type": "SparsityHook", "log_interval": log_interval}]
    cfg.work_dir = str(work_dir)
    cfg.randomness = {"seed": seed}
    cfg.default_hooks.logger.interval = log_interval
    cfg.default_hooks.checkpoint = (
        {"type": "CheckpointHook", "interval": checkpoint_interval} if checkpoint_interval else None)
    cfg.env_cfg.dist_cfg = {"backend": "gloo"}
    cfg.train_cfg = {"type": "EpochBasedTrainLoop", "max_epochs": epochs, "val_interval": val_interval}
    cfg.param_scheduler = [{"type": "LinearLR", "start_factor": 0.01, "by_epoch": False, "begin": 0,
                            "end": warmup_iters}]
    cfg.optim_wrapper = {"type": "OptimWrapper", "constructor": "SparsityOptimWrapperConstructor",
                         "optimizer": optimizer or {"type": "SGD", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4},
                         "clip_grad": {"max_norm": 35, "norm_type": 2}}
    with_mask = kind == "mask"
    scale = (image_size, image_size)
    train_pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "LoadAnnotations", "with_bbox": True, "with_mask": with_mask},
        {"type": "Resize", "scale": scale, "keep_ratio": True},
        {"type": "RandomFlip", "prob": 0.5},
        {"type": "PackDetInputs"},
    ]
    test_pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": scale, "keep_ratio": True},
        {"type": "LoadAnnotations", "with_bbox": True, "with_mask": with_mask},
        {"type": "PackDetInputs", "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")},
    ]
    metainfo = {"classes": CLASSES}
    root = str(data_root) + "/"
    for split, loader in (("train", cfg.train_dataloader), ("val", cfg.val_dataloader)):
        loader.num_workers = 0
        loader.persistent_workers = False
        loader.batch_size = batch_size if split == "train" else 8
        loader.pop("batch_sampler", None)
        loader.dataset.update(data_root=root, metainfo=metainfo, ann_file=f"annotations/instances_{split}2017.json",
                              data_prefix={"img": f"{split}2017/"},
                              pipeline=train_pipeline if split == "train" else test_pipeline)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = {"type": "CocoMetric", "ann_file": root + "annotations/instances_val2017.json",
                         "metric": ["bbox", "segm"] if with_mask else ["bbox"], "format_only": False}
    cfg.test_evaluator = cfg.val_evaluator
    cfg.visualizer.vis_backends = [{"type": "LocalVisBackend"}]
    cfg.visualizer.pop("name", None)  # one visualizer per runner (named after its run), not mmdet's global one
    return cfg


def ddp_main(data_root: str, work_dir: str) -> None:
    """One rank of a 2-process gloo run of mmengine's Runner (``torchrun --nproc_per_node 2 -m
    tests.detection.mmdet_helpers DATA WORK``): LBC 2:4 whose scores freeze at t_f=1 while DDP trains on; each
    rank saves its final state dict as ``rank<r>.pt``.

    mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device``, so the gloo group is made here first (the
    Runner then skips its own init) and the wrapper gets ``device_ids=None`` (a CPU module).
    """
    import torch
    import torch.distributed as dist
    from mmengine.runner import Runner

    import lbc.detection.plugin  # noqa: F401
    from lbc.detection.checkpoint import mmengine_safe_globals

    dist.init_process_group("gloo")
    cfg = detection_config("faster", Path(data_root), Path(work_dir), epochs=2, batch_size=2,
                           sparsity={"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 1})
    cfg.launcher = "pytorch"
    cfg.model_wrapper_cfg = {"type": "MMDistributedDataParallel", "device_ids": None}
    runner = Runner.from_cfg(cfg)
    with mmengine_safe_globals():
        runner.train()
    model = runner.model.module
    frozen = [not s.requires_grad for s in model.sparsity.score_parameters()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "frozen": frozen, "iter": runner.iter, "wrapper": type(runner.model).__name__,
                "exact": model.sparsity.is_exact_nm()}, Path(work_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    ddp_main(sys.argv[1], sys.argv[2])

"""The detection task's schemas (``task=detection``; ``lbc.detection.config`` turns them into an mmengine
Config): the detector, COCO-layout data, mmdet's step schedule and the Runner's trainer keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lbc.config.resume import ALLOW, IGNORE, REFUSE, on_resume
from lbc.errors import is_number, require
from lbc.run.cadence import checkpoint_cadence

__all__ = [
    "CocoDataConfig", "CocoShapesDataConfig", "DETECTION_PARTS", "DetectionTrainerConfig",
    "DetectorConfig", "RESNET_DEPTHS", "StepScheduleConfig",
]

DETECTION_PARTS = ("backbone", "neck", "rpn_head", "roi_head")  # a two-stage detector's top-level children
RESNET_DEPTHS = (18, 34, 50, 101, 152)


@dataclass
class DetectorConfig:
    """An MMDetection two-stage detector: mmdet's shipped config file plus the keys lbc owns.

    ``num_classes`` is not here: it comes from the data (``data.classes``).
    """

    name: str = MISSING
    mmdet_config: str = MISSING  # relative to mmdet's shipped configs dir (mmdet/.mim/configs), or an absolute path
    depth: int = 50  # ResNet depth of the backbone: 18, 34, 50, 101, 152
    backbone_init: str = "random"  # random | path of a converted classification checkpoint (tools/convert_backbone.py)
    sparsify_parts: list[str] = field(default_factory=lambda: ["backbone"])  # detector parts the method covers
    cfg_options: dict[str, Any] = field(default_factory=dict)  # mmengine dotted keys -> values, applied last

    def __post_init__(self) -> None:
        require(bool(self.mmdet_config) and self.mmdet_config.endswith(".py"), "model.mmdet_config", self.mmdet_config,
                "use an mmdet config file (.py), relative to mmdet's configs dir or absolute")
        require(self.depth in RESNET_DEPTHS, "model.depth", self.depth,
                f"choose from: {', '.join(map(str, RESNET_DEPTHS))}")
        init = str(self.backbone_init)
        require(not (init == "torchvision" or "://" in init), "model.backbone_init", self.backbone_init,
                "lbc never downloads weights: use random, or the path of a checkpoint converted with "
                "tools/convert_backbone.py")
        require(bool(init), "model.backbone_init", self.backbone_init, "use random or a checkpoint path")
        self.sparsify_parts = [self.sparsify_parts] if isinstance(self.sparsify_parts, str) else list(self.sparsify_parts)
        unknown = [p for p in self.sparsify_parts if p not in DETECTION_PARTS]
        require(not unknown and bool(self.sparsify_parts), "model.sparsify_parts", self.sparsify_parts,
                f"choose one or more of: {', '.join(DETECTION_PARTS)}")
        require(len(set(self.sparsify_parts)) == len(self.sparsify_parts), "model.sparsify_parts",
                self.sparsify_parts, "name each part once")


@dataclass
class CocoDataConfig:
    """A COCO-layout data set: ``root/annotations/instances_{train,val}2017.json``, ``root/{train,val}2017/``."""

    name: str = "coco"
    root: str = on_resume(IGNORE, default=MISSING)
    classes: list[str] | None = None  # null: mmdet's CocoDataset classes (the 80 of COCO)
    batch_size: int = 2  # training images per process (mmdet's 1x: 2 per GPU x 8 GPUs = 16)
    val_batch_size: int = on_resume(ALLOW, default=1)  # evaluation images per process
    num_workers: int = on_resume(ALLOW, default=2)  # data loader worker processes per process
    image_scale: list[int] = field(default_factory=lambda: [1333, 800])  # Resize scale (keep_ratio): long, short side

    def __post_init__(self) -> None:
        require(bool(str(self.root)), "data.root", self.root, "use the COCO root directory")
        require(self.classes is None or len(self.classes) >= 1 and len(set(self.classes)) == len(self.classes),
                "data.classes", self.classes, "use a list of distinct class names, or null for the 80 COCO classes")
        for key in ("batch_size", "val_batch_size"):
            require(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "use a positive integer")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use an integer >= 0")
        require(len(self.image_scale) == 2 and all(v >= 32 for v in self.image_scale), "data.image_scale",
                list(self.image_scale), "use [long side, short side], each >= 32")


@dataclass
class CocoShapesDataConfig(CocoDataConfig):
    """lbc's generated shapes set (lbc.detection.shapes), COCO layout; written to ``root`` when missing."""

    name: str = "coco_shapes"
    train_images: int = 240
    val_images: int = 60
    image_size: int = 128
    max_objects: int = 3
    seed: int = 0  # the data set's seed (not the run's)

    def __post_init__(self) -> None:
        super().__post_init__()
        limits = {"train_images": 1, "val_images": 1, "image_size": 32, "max_objects": 1, "seed": 0}
        for key, low in limits.items():
            require(getattr(self, key) >= low, f"data.{key}", getattr(self, key), f"use an integer >= {low}")


@dataclass
class StepScheduleConfig:
    """Step decay of optim.lr by ``gamma`` at each milestone epoch, after a linear warm-up over
    ``warmup_iters`` iterations from ``warmup_ratio * optim.lr`` (mmdet's LinearLR + MultiStepLR)."""

    name: str = "step"
    epochs: int = 12
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_ratio: float = 0.001

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "schedule.epochs", self.epochs, "use a positive integer")
        ms = list(self.milestones)
        require(all(0 < m < self.epochs for m in ms) and ms == sorted(set(ms)), "schedule.milestones", ms,
                f"use increasing epochs between 1 and schedule.epochs-1={self.epochs - 1} (or [])")
        require(is_number(self.gamma) and 0 < self.gamma <= 1, "schedule.gamma", self.gamma, "use 0 < gamma <= 1")
        require(self.warmup_iters >= 0, "schedule.warmup_iters", self.warmup_iters, "use an integer >= 0 (0 = off)")
        require(is_number(self.warmup_ratio) and 0 < self.warmup_ratio <= 1, "schedule.warmup_ratio",
                self.warmup_ratio, "use 0 < ratio <= 1")


@dataclass
class DetectionTrainerConfig:
    """How mmengine's Runner runs: device, precision, cadence of evaluation, logs and checkpoints."""

    device: str = on_resume(IGNORE, default="auto")  # auto (cuda if available, else cpu) | cpu | cuda
    amp: bool = False  # mixed precision (mmengine's AmpOptimWrapper, CUDA only)
    val_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_interval: int = on_resume(IGNORE, default=50)  # iterations between log lines / TensorBoard train scalars
    checkpoint_interval: int = 1  # epochs between checkpoints (epoch_<n>.pth; the last epoch is always saved)
    # iter_<n>.pth inside an epoch too (the newest one only): every N iterations (an int), every N minutes of
    # training ("10min"), or null (epoch ends only); a SIGTERM, SIGUSR1 or first Ctrl-C writes it at the current one
    checkpoint_every: Any = on_resume(IGNORE, default="10min")
    max_keep_checkpoints: int | None = None  # keep the newest N epoch checkpoints; null = all (configs: 2)
    progress: bool = on_resume(IGNORE, default=True)  # mmengine's log lines on the console (run_dir/<time>/<time>.log keeps them anyway)
    deterministic: bool = False  # torch deterministic algorithms (mmengine randomness.deterministic)
    auto_scale_lr: int | None = on_resume(REFUSE, default=None)  # null: optim.lr as given; N: for a total batch N

    def __post_init__(self) -> None:
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device", self.device, "choose from: auto, cpu, cuda")
        checkpoint_cadence(self.checkpoint_every)
        for key in ("val_interval", "log_interval", "checkpoint_interval"):
            require(getattr(self, key) >= 1, f"trainer.{key}", getattr(self, key), "use a positive integer")
        for key in ("max_keep_checkpoints", "auto_scale_lr"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"trainer.{key}", value, "use a positive integer or null")

"""The training config's schemas (Hydra structured configs), its checks, and the resolvers it uses.

Every group option (``lbc/configs/<group>/<option>.yaml``) extends a dataclass stored here in
Hydra's ConfigStore as ``<group>/base_<option>``: OmegaConf then refuses an unknown key or a value
of the wrong type while composing, and the dataclass's ``__post_init__`` checks ranges when
:func:`validate` builds the typed objects. Each key therefore lives in its dataclass (name, type,
default, allowed range) and its YAML (the value this option sets); the code reads it.

Errors, whichever layer finds them, become one line naming the key and what is allowed
(:func:`one_line`). Importing this module registers the numeric resolvers ``${div:a,b}``,
``${mul:a,b}`` and ``${sub:a,b}`` and the schemas.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lbc.errors import ConfigError
from lbc.sparsity.options import OPTIONS as SPARSITY_OPTIONS
from lbc.sparsity.options import is_number, require

__all__ = ["SCHEMAS", "div", "mul", "one_line", "per_process_batch", "register_resolvers", "register_schemas", "scaled_lr",
           "sub", "validate"]


# --- optim ------------------------------------------------------------------------------------
@dataclass
class SGDConfig:
    """SGD with momentum; weight decay skips norm layers and biases (lbc.engine.optim)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        require(self.name == "sgd", "optim.name", self.name, "this schema is SGD's; pick another with optim=<option>")
        require(is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "use a positive number")
        require(is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", self.momentum,
                "use 0 <= momentum < 1")
        require(not self.nesterov or self.momentum > 0, "optim.nesterov", self.nesterov, "it needs optim.momentum > 0")
        require(is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
                "use a number >= 0")


@dataclass
class AdamWConfig:
    """AdamW (DeiT recipe values); weight decay skips norm layers and biases (lbc.engine.optim)."""

    name: str = "adamw"
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        require(self.name == "adamw", "optim.name", self.name, "this schema is AdamW's; pick another with optim=<option>")
        require(is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "use a positive number")
        require(len(self.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in self.betas), "optim.betas",
                list(self.betas), "use two numbers in [0, 1)")
        require(is_number(self.eps) and self.eps > 0, "optim.eps", self.eps, "use a positive number")
        require(is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
                "use a number >= 0")


# --- schedule ---------------------------------------------------------------------------------
@dataclass
class CosineConfig:
    """Cosine decay of optim.lr to min_lr with a linear warm-up from warmup_lr, updated every step."""

    name: str = "cosine"
    epochs: int = 15
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "schedule.epochs", self.epochs, "use a positive integer")
        require(is_number(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs, "schedule.warmup_epochs",
                self.warmup_epochs, f"use 0 <= warmup_epochs < schedule.epochs={self.epochs}")
        for key in ("warmup_lr", "min_lr"):
            value = getattr(self, key)
            require(is_number(value) and value >= 0, f"schedule.{key}", value, "use a number >= 0")


# --- trainer ----------------------------------------------------------------------------------
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainerConfig:
    """How the loop runs (lbc.engine): device, precision, logging and checkpoint cadence, resume."""

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    amp: str | None = None  # null | bf16 | fp16 (autocast on CUDA only; fp16 adds a GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    ema: bool = False  # keep a timm ModelEmaV3 copy and evaluate it too
    ema_decay: float = 0.99996
    clip_grad: float | None = None  # max gradient norm, or null
    log_interval: int = 10  # steps between TensorBoard train scalars / progress-bar updates
    ckpt_interval: int = 1  # epochs between writes of last.pt (always written after the last epoch)
    max_steps_per_epoch: int | None = None  # cut each training epoch short (smoke runs)
    max_eval_steps: int | None = None  # cut evaluation short
    progress: bool = True  # tqdm bars and per-epoch lines on rank 0
    resume: str | None = None  # checkpoint path; null = <run_dir>/last.pt if it exists
    init_from: str | None = None  # start from these model weights (e.g. a dense run for ASP)
    find_unused_parameters: bool = False  # passed to DistributedDataParallel
    auto_scale_lr: int | None = None  # null: optim.lr as given; N: optim.lr is for a total batch of N, scaled linearly

    def __post_init__(self) -> None:
        require(bool(_DEVICE.fullmatch(self.device)), "trainer.device", self.device,
                "choose from: auto, cpu, cuda, cuda:N")
        require(self.amp in (None, "bf16", "fp16"), "trainer.amp", self.amp, "choose from: bf16, fp16, null")
        require(is_number(self.ema_decay) and 0 < self.ema_decay < 1, "trainer.ema_decay", self.ema_decay,
                "use 0 < decay < 1")
        require(self.clip_grad is None or is_number(self.clip_grad) and self.clip_grad > 0, "trainer.clip_grad",
                self.clip_grad, "use a positive number or null")
        for key in ("log_interval", "ckpt_interval", "max_steps_per_epoch", "max_eval_steps", "auto_scale_lr"):
            value = getattr(self, key)
            optional = key.startswith("max_") or key == "auto_scale_lr"
            require(value is None and optional or value is not None and value >= 1, f"trainer.{key}", value,
                    "use a positive integer" + (" or null" if optional else ""))


# --- data -------------------------------------------------------------------------------------
@dataclass
class LoaderConfig:
    """-> lbc.data.build_loader: the batch (per process, or global), worker processes, timm repeated augmentation.

    Set one of ``batch_size`` (per process: the global batch grows with the processes) and
    ``global_batch_size`` (all processes together: each loads global / processes), the other null.
    """

    batch_size: int | None = 64  # per process; null: global_batch_size / processes
    global_batch_size: int | None = None  # all processes together (the paper presets); needs batch_size=null
    workers: int = 0
    repeated_aug: int = 0  # timm RepeatAugSampler repeats (DeiT: 3); 0 = off
    drop_last: bool | None = None  # null: drop the last partial batch when training

    def __post_init__(self) -> None:
        for key in ("batch_size", "global_batch_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.loader.{key}", value, "use a positive integer or null")
        per_process_batch(self.batch_size, self.global_batch_size, 1)  # one of the two, not both
        require(self.workers >= 0, "data.loader.workers", self.workers, "use an integer >= 0")
        require(self.repeated_aug >= 0, "data.loader.repeated_aug", self.repeated_aug, "use an integer >= 0")


def per_process_batch(batch_size: int | None, global_batch_size: int | None, world_size: int) -> int:
    """The batch each of ``world_size`` processes loads (``data.loader``): ``batch_size`` as given, or
    ``global_batch_size / world_size``, which must divide; exactly one of the two is set."""
    if batch_size is not None and global_batch_size is not None:
        raise ConfigError(f"data.loader.batch_size={batch_size} and data.loader.global_batch_size={global_batch_size} "
                          "are both set; set one (per process, or all processes together) and the other to null")
    if global_batch_size is None:
        require(batch_size is not None, "data.loader.batch_size", batch_size,
                "set data.loader.batch_size (per process) or data.loader.global_batch_size (all processes together)")
        return batch_size
    if global_batch_size % world_size:
        raise ConfigError(f"data.loader.global_batch_size={global_batch_size} does not divide over {world_size} "
                          f"processes; use a multiple of {world_size}, or another number of processes")
    return global_batch_size // world_size


def scaled_lr(lr: float, global_batch_size: int, auto_scale_lr: int | None) -> float:
    """The lr a run uses (``trainer.auto_scale_lr``): ``lr`` as given when null, else the linear scaling rule
    ``lr * global_batch_size / auto_scale_lr`` (``optim.lr`` is the lr for a total batch of ``auto_scale_lr``)."""
    return lr if auto_scale_lr is None else lr * global_batch_size / auto_scale_lr


@dataclass
class AugmentConfig:
    """-> lbc.data.build_mixup: timm Mixup/CutMix alphas and label smoothing (all 0: plain labels)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        for key in ("mixup", "cutmix"):
            require(is_number(getattr(self, key)) and getattr(self, key) >= 0, f"data.augment.{key}",
                    getattr(self, key), "use a number >= 0 (0 = off)")
        for key in ("label_smoothing", "prob", "switch_prob"):
            value = getattr(self, key)
            require(is_number(value) and 0 <= value <= 1 and (key != "label_smoothing" or value < 1),
                    f"data.augment.{key}", value, "use a number in [0, 1)" if key == "label_smoothing" else
                    "use a number in [0, 1]")


@dataclass
class DataConfig:
    """Keys every data set has; the rest are the builder's options (``lbc.data.build_datasets``)."""

    name: str = MISSING
    num_classes: int | None = None  # checked against the data (null: take what the data says)
    input_size: list[int] | None = None  # [C, H, W], checked against the data
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        require(self.num_classes is None or self.num_classes >= 1, "data.num_classes", self.num_classes,
                "use a positive integer or null")
        require(self.input_size is None or len(self.input_size) == 3 and all(v >= 1 for v in self.input_size),
                "data.input_size", self.input_size, "use [C, H, W] with positive sizes")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's 8x8 handwritten digits, upscaled, 3 channels; fixed 1437/360 split, in memory."""

    name: str = "digits"
    image_size: int = 32
    train_augment: bool = False  # small random affine on train images

    def __post_init__(self) -> None:
        require(self.image_size >= 8, "data.image_size", self.image_size, "use an integer >= 8 (the digits are 8x8)")
        super().__post_init__()  # after: input_size follows image_size, and the key the user set is this one


@dataclass
class FolderConfig(DataConfig):
    """ImageNet-layout folders ``root/<split>/<class>/<image>``, timm's transforms."""

    name: str = "folder"
    root: str = MISSING
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    interpolation: str = "bilinear"  # nearest, bilinear, bicubic, box, hamming, lanczos, random
    rand_augment: str | None = None  # timm auto_augment string, e.g. rand-m9-mstd0.5-inc1; null = off
    reprob: float = 0.0  # random erasing probability (timm re_prob)
    re_mode: str = "pixel"  # random erasing fill: pixel (DeiT), rand, const
    re_count: int = 1
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # RandomResizedCrop aspect range
    hflip: float = 0.5
    color_jitter: float | None = None  # null = off (timm's default 0.4)
    crop_pct: float = 0.875  # val: resize to image_size / crop_pct, centre-crop image_size
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        require(self.image_size >= 1, "data.image_size", self.image_size, "use a positive integer")
        super().__post_init__()
        for key in ("reprob", "hflip"):
            value = getattr(self, key)
            require(0 <= value <= 1, f"data.{key}", value, "use a probability in [0, 1]")
        require(self.re_mode in ("pixel", "rand", "const"), "data.re_mode", self.re_mode,
                "choose from: pixel, rand, const")
        require(0 < self.crop_pct <= 1, "data.crop_pct", self.crop_pct, "use 0 < crop_pct <= 1")


@dataclass
class SyntheticConfig(DataConfig):
    """Random images, deterministic per index: speed and memory benchmarks, smoke runs."""

    name: str = "synthetic"
    train_size: int = 1024
    val_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("train_size", "val_size"):
            require(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "use a positive integer")


# --- model ------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """-> lbc.models.build_model(name, num_classes=<from the data>, source=..., **options); random init."""

    name: str = MISSING  # a name of lbc's registry, torchvision.models or timm (or prefixed: timm/<name>)
    source: str | None = None  # lbc | torchvision | timm; null: lbc, then torchvision, then timm
    extra: dict[str, Any] = field(default_factory=dict)  # more builder keywords: +model.extra.drop_rate=0.1

    def __post_init__(self) -> None:
        require(self.source in (None, "lbc", "torchvision", "timm"), "model.source", self.source,
                "choose from: lbc, torchvision, timm, null")


@dataclass
class ResNetSmallConfig(ModelConfig):
    """CIFAR-style ResNet for 32x32 inputs (lbc's own model)."""

    name: str = "resnet_small"
    source: str | None = "lbc"
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    in_channels: int = 3


@dataclass
class TorchvisionModelConfig(ModelConfig):
    """Any ``torchvision.models.get_model`` name (the builder's defaults for everything else)."""

    source: str | None = "torchvision"


@dataclass
class TimmViTConfig(ModelConfig):
    """A timm vision transformer (``timm.create_model`` keywords)."""

    source: str | None = "timm"
    drop_path_rate: float = 0.0
    img_size: int = 224
    in_chans: int = 3


# --- task -------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    """What kind of job this is and which function runs it (``lbc-train`` calls ``task.runner(cfg)``)."""

    name: str = MISSING  # classification | detection (informational: the runner is what counts)
    runner: str = MISSING  # dotted path of run(cfg: DictConfig) -> dict of final metrics

    def __post_init__(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", self.runner)), "task.runner", self.runner,
                "use the dotted path of a function, e.g. lbc.engine.trainer.run")


# --- detection (task=detection; lbc.detection.config turns these into an mmengine Config) ------
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
    root: str = MISSING
    classes: list[str] | None = None  # null: mmdet's CocoDataset classes (the 80 of COCO)
    batch_size: int = 2  # training images per process (mmdet's 1x: 2 per GPU x 8 GPUs = 16)
    val_batch_size: int = 1  # evaluation images per process
    num_workers: int = 2  # data loader worker processes per process
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

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    amp: bool = False  # mixed precision (mmengine's AmpOptimWrapper, CUDA only)
    val_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_interval: int = 50  # iterations between log lines / TensorBoard train scalars
    checkpoint_interval: int = 1  # epochs between checkpoints (epoch_<n>.pth; the last epoch is always saved)
    max_keep_checkpoints: int | None = None  # keep the newest N epoch checkpoints; null = all
    progress: bool = True  # mmengine's log lines on the console (run_dir/<time>/<time>.log keeps them anyway)
    deterministic: bool = False  # torch deterministic algorithms (mmengine randomness.deterministic)
    auto_scale_lr: int | None = None  # null: optim.lr as given; N: optim.lr is for a total batch N, scaled linearly

    def __post_init__(self) -> None:
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device", self.device, "choose from: auto, cpu, cuda")
        for key in ("val_interval", "log_interval", "checkpoint_interval"):
            require(getattr(self, key) >= 1, f"trainer.{key}", getattr(self, key), "use a positive integer")
        for key in ("max_keep_checkpoints", "auto_scale_lr"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"trainer.{key}", value, "use a positive integer or null")


# --- the whole run ----------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The primary config: one option per group, the seed, and where the run writes."""

    model: Any = MISSING
    data: Any = MISSING
    sparsity: Any = MISSING
    optim: Any = MISSING
    schedule: Any = MISSING
    trainer: Any = MISSING
    task: Any = MISSING  # classification | detection: which runner, and (task=detection) the groups' defaults
    seed: int = 0
    run_dir: str = MISSING  # config.yaml, metrics.jsonl, TensorBoard events and last.pt go here


# group -> {option file name: its schema}. ``lbc/configs/<group>/<option>.yaml`` starts with
# ``defaults: [base_<option>, _self_]``; a test checks that every option file does.
SCHEMAS: dict[str, dict[str, type]] = {
    "optim": {"sgd": SGDConfig, "adamw": AdamWConfig},
    "schedule": {"cosine": CosineConfig, "step_1x": StepScheduleConfig},
    "trainer": {"default": TrainerConfig, "detection": DetectionTrainerConfig},
    "data": {"digits": DigitsConfig, "imagenet": FolderConfig, "synthetic": SyntheticConfig,
             "coco": CocoDataConfig, "coco_shapes": CocoShapesDataConfig},
    "model": {"resnet_small": ResNetSmallConfig, "resnet18": TorchvisionModelConfig,
              "resnet50": TorchvisionModelConfig, "deit_small_patch16_224": TimmViTConfig,
              "faster_rcnn_r50_fpn": DetectorConfig, "mask_rcnn_r50_fpn": DetectorConfig,
              "faster_rcnn_r18_fpn_shapes": DetectorConfig, "mask_rcnn_r18_fpn_shapes": DetectorConfig},
    "sparsity": dict(SPARSITY_OPTIONS),
    "task": {"classification": TaskConfig, "detection": TaskConfig},
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_train", node=TrainConfig)
    for group, options in SCHEMAS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"base_{option}", node=schema)
    # for a user's own model file: defaults: [base_timm, _self_] or [base_torchvision, _self_]
    store.store(group="model", name="base_timm", node=ModelConfig(source="timm"))
    store.store(group="model", name="base_torchvision", node=TorchvisionModelConfig)


# --- resolvers --------------------------------------------------------------------------------
def _number(x: Any) -> int | float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise ConfigError(f"resolver argument {x!r} is not a number") from None
    return x


def div(a: Any, b: Any) -> int | float:
    """``${div:a,b}``: a / b; an int when both are ints and b divides a (epochs stay ints)."""
    a, b = _number(a), _number(b)
    if b == 0:
        raise ConfigError(f"${{div:{a},{b}}} divides by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    return a / b


def mul(a: Any, b: Any) -> int | float:
    """``${mul:a,b}``: a * b."""
    return _number(a) * _number(b)


def sub(a: Any, b: Any) -> int | float:
    """``${sub:a,b}``: a - b."""
    return _number(a) - _number(b)


def register_resolvers() -> None:
    """Register ``div``, ``mul`` and ``sub`` once (idempotent; importing this module does it)."""
    for name, fn in (("div", div), ("mul", mul), ("sub", sub)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
register_schemas()


# --- checks and messages ----------------------------------------------------------------------
_SCHEMA_BY_NAME = {
    schema.__name__: schema for options in SCHEMAS.values() for schema in options.values()
} | {schema.__name__: schema for schema in (TrainConfig, LoaderConfig, AugmentConfig, ModelConfig, DataConfig)}


def _allowed_keys(object_type: str | None) -> str:
    schema = _SCHEMA_BY_NAME.get(object_type or "")
    if schema is None:
        return ""
    return "; allowed: " + ", ".join(sorted(f.name for f in dataclasses.fields(schema)))


def _type_hint(message: str) -> str:
    match = re.search(r"could not be converted to (\w+)|is not a valid (\w+)", message)
    if match:
        kind = match.group(1) or match.group(2)
        return {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "bool": "true or false",
                "int": "an integer", "float": "a number"}.get(kind, kind)
    return ""


def one_line(message: str, full_key: str | None = None, object_type: str | None = None) -> str:
    """One line naming the key and what is allowed, from an OmegaConf/Hydra error's text.

    OmegaConf's messages carry ``full_key: ...`` and ``object_type=...`` lines; Hydra's composition
    errors print them under their own first line. Both are folded into one sentence here.
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("full_key:") and not full_key:
            full_key = ln.split(":", 1)[1].strip()
        elif ln.startswith("object_type=") and not object_type:
            object_type = ln.split("=", 1)[1].strip()
    body = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=",
                                                     "Set the environment variable HYDRA_FULL_ERROR"))]
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:  # a group option that does not exist: model=nope
        group, option = missing.groups()
        options = []
        if "Available options in" in message:
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
            options = []
            for ln in lines[start + 1:]:
                if ln.startswith(("Config search path", "Set the environment variable")):
                    break
                if not ln.startswith("base_"):
                    options.append(ln.split()[0])
        return f"{group}={option} is not a known option of the {group} group; choose from: {', '.join(options)}"
    not_in = next((ln for ln in body if re.search(r"Key '([^']+)' (is )?not in", ln)), None)
    if not_in is not None:
        key = full_key or re.search(r"Key '([^']+)'", not_in).group(1)
        return f"{key} is not a known key{_allowed_keys(object_type)}"
    conversion = next((ln for ln in body if "could not be converted" in ln or "Invalid value assigned" in ln
                       or "Non optional field" in ln or "is not a ListConfig" in ln or "is not a valid" in ln), None)
    if conversion is not None and full_key:
        hint = _type_hint(conversion)
        reason = f"use {hint}" if hint else conversion.rstrip(".")
        value = re.search(r"Value '([^']*)'", conversion)
        shown = f"={value.group(1)!r}" if value else ""
        return f"{full_key}{shown} is not allowed; {reason}"
    first = " ".join((body or lines or ["invalid config"])[0].split())
    if full_key and full_key not in first:
        first = f"{full_key}: {first}"
    return first


def as_config_error(err: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf exception as our one-line ConfigError."""
    cause = err.__cause__
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(one_line(str(err), getattr(err, "full_key", None), getattr(err, "object_type_str", None)))


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Refuse keys the schema does not have (``+group.key=...`` adds one past the struct check)."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in names:
            raise ConfigError(f"{prefix}.{key} is not a known key; allowed: {', '.join(sorted(names))}")
        sub = names[key].type
        nested = _SCHEMA_BY_NAME.get(sub if isinstance(sub, str) else getattr(sub, "__name__", ""))
        if nested is not None and OmegaConf.is_dict(node._get_node(key)):
            _check_keys(node[key], nested, f"{prefix}.{key}")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the composed config; return each group as its typed dataclass object.

    Types and unknown keys were checked while composing (the schemas); this runs the range checks
    next to the fields (``__post_init__``) and the few that span groups. Any problem is one
    ConfigError line naming the key.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: pass {missing[0]}=... on the command line")
    typed: dict[str, Any] = {}
    try:
        for group in SCHEMAS:
            if group not in cfg:  # a config without this group (a user's own primary config)
                continue
            node = cfg[group]
            schema = OmegaConf.get_type(node)
            if schema is dict or schema is None:  # a user's own option without a schema: as it is
                typed[group] = node
                continue
            _check_keys(node, schema, group)
            typed[group] = OmegaConf.to_object(node)
        seed, run_dir = cfg.seed, cfg.run_dir
    except OmegaConfBaseException as err:
        raise as_config_error(err) from None
    require(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "use an integer")
    require(isinstance(run_dir, str) and bool(run_dir), "run_dir", run_dir, "use a directory path")
    optim, schedule = typed.get("optim"), typed.get("schedule")
    if hasattr(schedule, "min_lr") and hasattr(optim, "lr"):  # a schedule that decays to a floor (cosine)
        require(schedule.min_lr <= optim.lr, "schedule.min_lr", schedule.min_lr, f"use at most optim.lr={optim.lr}")
    return typed

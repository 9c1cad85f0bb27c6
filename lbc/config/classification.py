"""The classification task's schemas (``task=classification``): optimizers, the cosine schedule, the
trainer, the loader and augmentation, data sets and models. Each key's name, type, default and range
check live here; its YAML (``lbc/configs/<group>/<option>.yaml``) sets the value an option uses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from lbc.batching import per_process_batch
from lbc.config.resume import IGNORE, REFUSE, on_resume
from lbc.errors import is_number, require
from lbc.run.cadence import checkpoint_cadence

__all__ = [
    "AdamWConfig", "AugmentConfig", "CosineConfig", "DataConfig", "DigitsConfig", "FolderConfig",
    "LoaderConfig", "ModelConfig", "ResNetSmallConfig", "SGDConfig", "SyntheticConfig", "TimmViTConfig",
    "TorchvisionModelConfig", "TrainerConfig",
]


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

    device: str = on_resume(IGNORE, default="auto")  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    amp: str | None = None  # null | bf16 | fp16 (autocast on CUDA only; fp16 adds a GradScaler)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    ema: bool = False  # keep a timm ModelEmaV3 copy and evaluate it too
    ema_decay: float = 0.99996
    clip_grad: float | None = None  # max gradient norm, or null
    log_interval: int = on_resume(IGNORE, default=10)  # steps between TensorBoard train scalars / progress-bar updates
    ckpt_interval: int = on_resume(IGNORE, default=1)  # epochs between writes of last.pt (always written after the last epoch)
    # last.pt inside an epoch too: every N steps (an int), or every N minutes of training ("10min"), or null
    # (epoch ends only); a SIGTERM, SIGUSR1 or first Ctrl-C writes it at the current step anyway
    checkpoint_every: Any = on_resume(IGNORE, default="10min")
    max_steps_per_epoch: int | None = on_resume(REFUSE, default=None)  # cut each training epoch short (smoke runs)
    max_eval_steps: int | None = None  # cut evaluation short
    progress: bool = on_resume(IGNORE, default=True)  # tqdm bars and per-epoch lines on rank 0
    resume: str | None = on_resume(IGNORE, default=None)  # checkpoint path; null = <run_dir>/last.pt if it exists
    init_from: str | None = on_resume(IGNORE, default=None)  # start from these model weights (e.g. a dense run for ASP)
    find_unused_parameters: bool = on_resume(IGNORE, default=False)  # passed to DistributedDataParallel
    auto_scale_lr: int | None = on_resume(REFUSE, default=None)  # null: optim.lr as given; N: for a total batch of N

    def __post_init__(self) -> None:
        require(bool(_DEVICE.fullmatch(self.device)), "trainer.device", self.device,
                "choose from: auto, cpu, cuda, cuda:N")
        require(self.amp in (None, "bf16", "fp16"), "trainer.amp", self.amp, "choose from: bf16, fp16, null")
        require(is_number(self.ema_decay) and 0 < self.ema_decay < 1, "trainer.ema_decay", self.ema_decay,
                "use 0 < decay < 1")
        require(self.clip_grad is None or is_number(self.clip_grad) and self.clip_grad > 0, "trainer.clip_grad",
                self.clip_grad, "use a positive number or null")
        checkpoint_cadence(self.checkpoint_every)
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
    workers: int = on_resume(IGNORE, default=0)
    repeated_aug: int = 0  # timm RepeatAugSampler repeats (DeiT: 3); 0 = off
    drop_last: bool | None = None  # null: drop the last partial batch when training

    def __post_init__(self) -> None:
        for key in ("batch_size", "global_batch_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.loader.{key}", value, "use a positive integer or null")
        per_process_batch(self.batch_size, self.global_batch_size, 1)  # one of the two, not both
        require(self.workers >= 0, "data.loader.workers", self.workers, "use an integer >= 0")
        require(self.repeated_aug >= 0, "data.loader.repeated_aug", self.repeated_aug, "use an integer >= 0")



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
    root: str = on_resume(IGNORE, default=MISSING)
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

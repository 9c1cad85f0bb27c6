"""Image recipes for folder data sets (torchvision v2, timm's RandAugment/RandomErasing) and batch mixup."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from lbc.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875  # val: resize to image_size / 0.875, centre-crop image_size


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        allowed = ", ".join(m.value for m in InterpolationMode)
        raise ConfigError(f"data.interpolation={name!r} is not known; choose from: {allowed}") from None


def train_transform(
    image_size: int,
    interpolation: str = "bilinear",
    rand_augment: str | None = None,
    reprob: float = 0.0,
) -> v2.Compose:
    """RandomResizedCrop + flip (the standard recipe); DeiT adds ``rand_augment`` (timm string) and ``reprob``."""
    steps = [
        v2.RandomResizedCrop(image_size, interpolation=_interpolation(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if rand_augment:
        hparams = dict(
            translate_const=int(image_size * 0.45),
            img_mean=tuple(round(255 * m) for m in IMAGENET_MEAN),
            interpolation=str_to_pil_interp(interpolation),
        )
        steps.append(rand_augment_transform(rand_augment, hparams))  # on PIL images, as timm does
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode="pixel", device="cpu"))
    return v2.Compose(steps)


def val_transform(image_size: int, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side to ``int(image_size / 0.875)``, centre-crop ``image_size``, normalise."""
    return v2.Compose([
        v2.Resize(int(image_size / CROP_PCT), interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class EvenMixup(Mixup):
    """timm's Mixup, which needs an even batch: an odd batch (a skipped corrupt image) loses its last sample."""

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if len(x) % 2:
            x, target = x[:-1], target[:-1]
        return super().__call__(x, target)


def build_mixup(
    mixup: float,
    cutmix: float,
    label_smoothing: float,
    num_classes: int,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Mixup | None:
    """Batch mixup/cutmix with soft, smoothed targets (DeiT); None when both alphas are 0.

    With None the trainer applies ``label_smoothing`` in its cross-entropy itself; with a Mixup the
    targets it returns are soft and already smoothed (use timm's SoftTargetCrossEntropy).
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    return EvenMixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )

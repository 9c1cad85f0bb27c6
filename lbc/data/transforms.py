"""Image recipes for folder data sets (timm's ``create_transform``, as DeiT uses it) and batch mixup.

The recipes are timm's, not a copy of them: ``train_transform`` and ``val_transform`` pass our config
keys straight to ``timm.data.create_transform``, so the DeiT preset is DeiT's own
``create_transform(is_training=True, ...)`` call and the val recipe is timm's eval transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch import Tensor

from lbc.errors import ConfigError

# timm's names (timm.data.transforms.str_to_interp_mode); "random" picks bilinear or bicubic per image (train).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random")
SCALE = (0.08, 1.0)  # timm's RandomResizedCrop defaults
RATIO = (3 / 4, 4 / 3)


def _check_interpolation(name: str) -> str:
    if name not in INTERPOLATIONS:
        raise ConfigError(f"data.interpolation={name!r} is not known; choose from: {', '.join(INTERPOLATIONS)}")
    return name


def train_transform(
    image_size: int,
    interpolation: str = "bilinear",
    rand_augment: str | None = None,
    reprob: float = 0.0,
    *,
    re_mode: str = "pixel",
    re_count: int = 1,
    scale: Sequence[float] = SCALE,
    ratio: Sequence[float] = RATIO,
    hflip: float = 0.5,
    color_jitter: float | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """timm's train recipe: RandomResizedCrop, flip, then RandAugment (``rand_augment``) or colour jitter,
    normalise, random erasing (``reprob``). timm turns colour jitter off whenever ``rand_augment`` is set.
    """
    try:
        return create_transform(
            input_size=image_size,
            is_training=True,
            interpolation=_check_interpolation(interpolation),
            auto_augment=rand_augment or None,
            re_prob=reprob,
            re_mode=re_mode,
            re_count=re_count,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            color_jitter=color_jitter,
            mean=tuple(mean),
            std=tuple(std),
        )
    except (AssertionError, KeyError, ValueError) as e:  # timm's parsers assert on a bad augment string
        raise ConfigError(
            f"data.rand_augment={rand_augment!r} (or re_mode/color_jitter) is not accepted by "
            f"timm.data.create_transform: {e or type(e).__name__}; e.g. rand-m9-mstd0.5-inc1"
        ) from None


def val_transform(
    image_size: int,
    interpolation: str = "bilinear",
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """timm's eval recipe: resize the short side to ``floor(image_size / crop_pct)``, centre-crop, normalise."""
    interpolation = _check_interpolation(interpolation)
    return create_transform(
        input_size=image_size,
        is_training=False,
        interpolation="bilinear" if interpolation == "random" else interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )


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

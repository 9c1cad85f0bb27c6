"""Image recipes for folder data sets (timm's ``create_transform``, as DeiT uses it) and batch mixup.

The recipes are timm's, not a copy of them: ``train_transform`` and ``val_transform`` pass our config
keys straight to ``timm.data.create_transform``, so the DeiT preset is DeiT's own
``create_transform(is_training=True, ...)`` call and the val recipe is timm's eval transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch import Tensor
from torchvision import transforms

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


def _float32(values: Any) -> list[float]:
    """float32 values as the shortest decimals that read back as the same float32 (0.485, not 0.48500001)."""
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32).reshape(-1)]


def eval_preprocess(
    image_size: int,
    interpolation: str = "bilinear",
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> dict[str, Any]:
    """:func:`val_transform`'s steps as plain data, for an export's ``config.yaml`` and ONNX metadata.

    Read off the transform timm builds (not recomputed), so they cannot drift from what evaluation does:
    ``resize`` (short side to ``shorter_side``, long side ``int(shorter_side * long / short)``, PIL
    ``interpolation``), ``center_crop`` [H, W] (offsets ``round((size - crop) / 2)``), ``divide`` (8-bit
    pixels to 0-1), ``mean``/``std`` (of the 0-1 values, per channel). A step it cannot describe is an error.
    """
    recipe: dict[str, Any] = {"image_mode": "RGB", "channel_order": "RGB"}  # timm's ImageDataset: input_img_mode
    for step in val_transform(image_size, interpolation, crop_pct, mean, std).transforms:
        if isinstance(step, transforms.Resize) and isinstance(step.size, int) and step.max_size is None:
            recipe["resize"] = {"shorter_side": step.size, "interpolation": step.interpolation.value}
        elif isinstance(step, transforms.CenterCrop):
            recipe["center_crop"] = [int(v) for v in step.size]
        elif isinstance(step, transforms.ToTensor):
            recipe["divide"] = 255.0  # to_tensor of an 8-bit PIL image
        elif isinstance(step, transforms.Normalize):
            recipe["mean"], recipe["std"] = _float32(step.mean), _float32(step.std)
        else:
            raise RuntimeError(f"eval_preprocess cannot describe the eval transform's step {step!r}")
    if recipe["resize"]["shorter_side"] < min(recipe["center_crop"]):
        raise ConfigError(f"data.crop_pct={crop_pct}: the eval transform would pad the image (crop larger than "
                          "the resized image); use crop_pct <= 1")
    return recipe


def digits_preprocess(image_size: int = 32) -> dict[str, Any]:
    """What the digits data set's items are, in :func:`eval_preprocess`'s terms, for an export's metadata.

    The source is scikit-learn's 8x8 greyscale digits (levels 0-16, read as 0-1: bright ink on black),
    upscaled bilinearly to ``image_size``, normalised by the train split's one mean and std and repeated
    to 3 channels, as :func:`lbc.data.digits.build_digits` does (the tests check they agree).
    """
    from lbc.data.digits import upscaled_digits

    mean, std = (_float32(v) * 3 for v in upscaled_digits(image_size)[3])
    source = ("scikit-learn's 8x8 handwritten digits: greyscale, bright ink on a black background, the digit "
              f"filling the square, levels 0-16 read as 0-1; upscaled (bilinear) to {image_size}x{image_size} and "
              "repeated to 3 channels. Images of other digits should look alike: invert dark-on-light scans, "
              "crop to the digit")
    return {"image_mode": "L", "channel_order": "LLL", "resize": {"shorter_side": image_size, "interpolation": "bilinear"},
            "center_crop": [image_size, image_size], "divide": 255.0, "mean": mean, "std": std, "source": source}


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

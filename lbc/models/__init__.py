"""Models built by name: ``build_model(**cfg.model)``; the registry names are the config vocabulary.

Adding a model = one ``configs/model/<name>.yaml`` + one ``@MODELS.register`` entry below.
Every builder takes ``num_classes`` and keyword options; nothing downloads weights.
"""

from __future__ import annotations

from typing import Any

import timm
import torchvision
from torch import nn

from lbc.models.resnet_small import ResNetSmall
from lbc.registry import Registry

__all__ = ["MODELS", "ResNetSmall", "build_model"]

MODELS: Registry = Registry("model")


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; unknown names raise ConfigError naming ``model.name``."""
    return MODELS.get(name, key="model.name")(num_classes=num_classes, **kwargs)


@MODELS.register("resnet_small")
def resnet_small(num_classes: int, **kwargs: Any) -> nn.Module:
    return ResNetSmall(num_classes=num_classes, **kwargs)


@MODELS.register("resnet18")
def resnet18(num_classes: int, **kwargs: Any) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes, **kwargs)


@MODELS.register("resnet50")
def resnet50(num_classes: int, **kwargs: Any) -> nn.Module:
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


@MODELS.register("deit_small_patch16_224")
def deit_small_patch16_224(num_classes: int, **kwargs: Any) -> nn.Module:
    return timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)

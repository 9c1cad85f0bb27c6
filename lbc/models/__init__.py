"""Models built by name: ``build_model(**cfg.model)``, from our registry, torchvision or timm.

API
    build_model(name: str, num_classes: int, source: str | None = None, **kwargs) -> nn.Module
        ``source`` is ``lbc`` (the ``MODELS`` registry: our own models), ``torchvision``
        (``torchvision.models.get_model``) or ``timm`` (``timm.create_model``); a prefix in the name says
        the same (``timm/deit_small_patch16_224``, ``torchvision/resnet50``). With neither, the first
        source that has the name wins, in that order: lbc, torchvision, timm (so ``resnet50`` is
        torchvision's; ``source: timm`` picks timm's). ``kwargs`` go to the builder unchanged.
    resolve(name: str, source: str | None = None) -> tuple[str, str]
        The (source, bare name) ``build_model`` would use; ConfigError for an unknown one.

Nothing downloads: timm gets ``pretrained=False``, torchvision ``weights=None`` (and
``weights_backbone=None`` where the builder has one); asking for weights is a ConfigError.
Unknown names are one-line ConfigErrors naming ``model.name`` with a few close matches.
Adding one of our own models = one ``@MODELS.register`` entry below + one ``configs/model/<name>.yaml``.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

import timm
import torchvision
from torch import nn

from lbc.errors import ConfigError
from lbc.models.resnet_small import ResNetSmall
from lbc.registry import Registry

__all__ = ["MODELS", "SOURCES", "ResNetSmall", "build_model", "model_names", "resolve"]

MODELS: Registry = Registry("model")
SOURCES = ("lbc", "torchvision", "timm")  # also the lookup order when neither source nor prefix is given
WEIGHT_KEYS = ("pretrained", "weights", "weights_backbone")


@MODELS.register("resnet_small")
def resnet_small(num_classes: int, **kwargs: Any) -> nn.Module:
    return ResNetSmall(num_classes=num_classes, **kwargs)


def model_names(source: str) -> list[str]:
    """Every name ``source`` can build (timm also takes ``<name>.<pretrained tag>``)."""
    if source == "lbc":
        return MODELS.names()
    if source == "torchvision":
        return torchvision.models.list_models()
    return timm.list_models()


def _has(source: str, name: str) -> bool:
    if source == "lbc":
        return name in MODELS
    if source == "torchvision":
        return name in torchvision.models.list_models()
    return timm.is_model(name)


def resolve(name: str, source: str | None = None) -> tuple[str, str]:
    """The (source, bare name) for ``model.name`` and ``model.source``; one-line ConfigError if none has it."""
    if source is not None and source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not allowed; choose from: {', '.join(SOURCES)}, or null")
    if ":" in name:
        raise ConfigError(f"model.name={name!r}: hub names download; use a timm or torchvision model name")
    given = name
    prefix, _, bare = name.partition("/")
    if bare and prefix in SOURCES:
        if source is not None and source != prefix:
            raise ConfigError(f"model.name={name!r} says source {prefix} but model.source={source!r}; drop one")
        source, name = prefix, bare
    searched = [source] if source else list(SOURCES)
    for src in searched:
        if _has(src, name):
            return src, name
    names = {(src, n) for src in searched for n in model_names(src)}
    close = difflib.get_close_matches(name, sorted({n for _, n in names}), n=4)
    hints = [f"{src}/{n}" for n in close for src in searched if (src, n) in names][:5]
    where = f"a {source} model (model.source={source})" if source else "a model in lbc, torchvision or timm"
    hint = f"close matches: {', '.join(hints)}" if hints else "see timm.list_models() / torchvision.models.list_models()"
    raise ConfigError(f"model.name={given!r} is not {where}; {hint}")


def build_model(
    name: str, num_classes: int, source: str | None = None, extra: dict[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """A randomly initialised ``name`` from ``source`` (see the module docstring) with ``num_classes`` outputs.

    ``extra`` holds more builder keywords (the config's ``model.extra``), merged into ``kwargs``. A
    keyword the builder does not take is a one-line ConfigError, not a TypeError.
    """
    kwargs |= extra or {}
    asked = [k for k in WEIGHT_KEYS if kwargs.get(k) not in (None, False)]
    if asked:
        raise ConfigError(f"model.{asked[0]}={kwargs[asked[0]]!r}: lbc builds models randomly initialised and never "
                          "downloads; load weights from a file instead")
    kwargs = {k: v for k, v in kwargs.items() if k not in WEIGHT_KEYS}
    source, name = resolve(name, source)
    try:
        if source == "lbc":
            return MODELS.get(name, key="model.name")(num_classes=num_classes, **kwargs)
        if source == "timm":
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        builder = torchvision.models.get_model_builder(name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs["weights_backbone"] = None  # detection/segmentation builders default to downloading one
        return builder(weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unexpected is None:
            raise
        raise ConfigError(f"model.name={name!r} ({source}) does not take the option {unexpected.group(1)!r} "
                          "(from the model config or model.extra)") from None

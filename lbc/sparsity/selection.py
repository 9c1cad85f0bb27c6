"""Which Conv2d/Linear layers a method makes N:M, and why the others stay dense: pure functions.

The paper keeps the stem and the classifier dense (its counts imply it: Table 4's 3.52M parameters
for ResNet-50 at 1:16 hold exactly when the first conv and the fc are dense); for DeiT that is the
patch embedding and the head. Every other Conv2d/Linear whose input dimension M divides is
selected, minus the layers the user excludes by name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from lbc.errors import ConfigError
from lbc.sparsity.nm import NMPattern, eligibility, parse_pattern


def stem_and_classifier(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the model's stem and classifier layers (the paper keeps both dense).

    timm models name them in ``pretrained_cfg`` (``first_conv``, ``classifier``); otherwise the
    stem is the first Conv2d/Linear in module order and the classifier the last Linear.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    named = [[v] if isinstance(v, str) else list(v) if v else [] for v in (cfg.get("first_conv"), cfg.get("classifier"))]
    if any(named):
        return named[0], named[1]
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if isinstance(head, nn.Module):  # a transformers language model: its embeddings are not Linear; lm_head stays dense
        return [], [n for n, m in model.named_modules() if m is head]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    stem = [layers[0][0]] if layers else []
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    return stem, [n for n in linears[-1:] if n not in stem]


def default_dense_layers(model: nn.Module) -> list[str]:
    """Layers kept dense by default: the stem and the classifier (DeiT: patch embedding and head)."""
    stem, classifier = stem_and_classifier(model)
    return stem + classifier


@dataclass
class LayerSelection:
    """The outcome of :func:`select_layers`, in module order."""

    layers: dict[str, nn.Module] = field(default_factory=dict)  # name -> layer to make N:M
    dense_reasons: dict[str, str] = field(default_factory=dict)  # name -> why it stays dense
    exclude: list[str] = field(default_factory=list)  # the globs applied (given, or the defaults)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*"):
            return pattern
    return None


def select_layers(
    model: nn.Module,
    pattern: str | NMPattern,
    exclude: str | Iterable[str] | None = None,
    strict: bool = False,
) -> LayerSelection:
    """Split the model's Conv2d/Linear layers into those to make ``pattern`` and those kept dense.

    ``exclude``: module-name globs (a glob also matches the module's children); one string is one
    glob; None keeps the stem and the classifier dense. A layer that cannot be N:M (input
    dimension not divisible by M) stays dense with its reason, or, with ``strict``, is a one-line
    ConfigError. Touches nothing: the model is left as it is.
    """
    pattern = parse_pattern(pattern)
    if exclude is None:
        globs = default_dense_layers(model)
    else:
        globs = [exclude] if isinstance(exclude, str) else list(exclude)
    selection = LayerSelection(exclude=globs)
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        hit = _matches(name, globs)
        why = f"excluded by {hit!r}" if hit else eligibility(module, pattern)
        if why is None:
            selection.layers[name] = module
        else:
            selection.dense_reasons[name] = why
    if strict:
        bad = {n: r for n, r in selection.dense_reasons.items() if not r.startswith("excluded")}
        if bad:
            name, why = next(iter(bad.items()))
            raise ConfigError(f"sparsity.strict=true but layer {name!r} cannot be {pattern}: {why}")
    return selection

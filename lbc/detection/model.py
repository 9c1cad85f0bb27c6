"""``SparseDetector``: any MMDetection detector with an N:M sparsity method attached to some of its parts.

The wrapper builds the detector from its config, attaches ``lbc.sparsify`` to it (by default to the backbone
only, without its stem: the paper's detection setting) and delegates everything mmengine calls (forward,
train/val/test steps, the data preprocessor) to the detector, so mmengine's loops, evaluators, visualisers and
checkpoint hooks work unchanged. The method object is ``model.sparsity``; :class:`~lbc.detection.hook.SparsityHook`
drives its schedule and :class:`~lbc.detection.optim.SparsityOptimWrapperConstructor` gives its scores their
own optimizer group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmdet.registry import MODELS
from mmengine.config import ConfigDict
from mmengine.model import BaseModel
from torch import nn
from torch.nn.utils import parametrize

from lbc.errors import ConfigError
from lbc.sparsity import SparsityMethod, sparsify
from lbc.sparsity.base import FIRST_FORWARD

__all__ = ["SparseDetector", "dense_weights", "default_exclude"]


def default_exclude(detector: nn.Module, parts: Sequence[str]) -> list[str]:
    """Module-name globs (relative to ``detector``) kept dense by default.

    Every top-level child of the detector that is not in ``parts`` (neck, heads, data preprocessor), plus
    the backbone's stem when the backbone is sparsified: the paper keeps the stem dense. The stem is the
    backbone's first Conv2d (mmdet ResNet: ``backbone.conv1``); a deep stem (ResNetV1c/d: ``backbone.stem``)
    is kept dense as a whole.
    """
    children = [name for name, _ in detector.named_children() if name != "data_preprocessor"]  # no layers there
    unknown = [p for p in parts if p not in children]
    if isinstance(parts, str) or unknown or not parts:
        bad = parts if isinstance(parts, str) or not parts else unknown[0]
        raise ConfigError(f"SparseDetector parts={bad!r} is not allowed; use a list of the detector's parts "
                          f"({', '.join(children)})")
    globs = [name for name in children if name not in parts]
    if "backbone" in parts:
        backbone = detector.get_submodule("backbone")
        first = next((n for n, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if first is not None:
            path = first.split(".")
            stem = path[: path.index("stem") + 1] if "stem" in path else path
            globs.append(".".join(["backbone", *stem]))
    return globs


@contextlib.contextmanager
def dense_weights(model: nn.Module) -> Iterator[None]:
    """Within the context, every reparametrised ``layer.weight`` of ``model`` *is* its stored dense Parameter.

    mmengine's initialisers write into ``module.weight`` in place (``nn.init.kaiming_normal_(m.weight)``); on
    a reparametrised layer that attribute is a freshly computed masked tensor and the write would be lost
    silently. Here the parametrisation returns the stored weight itself, so those writes land where they
    should; masks, scores and alive sets are untouched.
    """
    patched = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            plist = module.parametrizations.weight
            plist.forward = (lambda p: (lambda: p.original))(plist)
            patched.append(plist)
    try:
        yield
    finally:
        for plist in patched:
            del plist.forward


@MODELS.register_module()
class SparseDetector(BaseModel):
    """An mmdet detector whose ``parts`` carry an N:M sparsity method (``lbc.sparsify``).

    Args:
        detector: the detector's config (``dict(type='MaskRCNN', backbone=..., ...)``), built with mmdet's MODELS.
        sparsity: ``lbc.sparsify`` keywords: ``method`` (a name in ``lbc.METHODS``; absent: ``lbc.sparsify``'s
            default) and the method's options (``pattern``, ``t_i``, ``t_f``, ``exclude``, ...). None: dense.
        parts: top-level children of the detector to sparsify (default: the backbone); the others stay dense.
            Ignored when ``sparsity`` names ``exclude`` globs (relative to the detector) itself.
        init_backbone: a checkpoint path whose backbone ``init_weights`` loads (``lbc.detection.backbone``).
        data_preprocessor: replaces the detector's data preprocessor config when given.
        init_cfg: mmengine's init config of the wrapper itself.
    """

    def __init__(
        self,
        detector: dict,
        sparsity: Mapping[str, Any] | None = None,
        parts: Sequence[str] = ("backbone",),
        init_backbone: str | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | list | None = None,
    ) -> None:
        if not isinstance(detector, Mapping) or "type" not in detector:
            raise ConfigError(f"SparseDetector detector={detector!r} is not allowed; use a detector config dict "
                              "with a type (e.g. dict(type='MaskRCNN', ...))")
        options = _sparsity_options(sparsity)
        detector = ConfigDict(detector)  # mmdet reads nested configs by attribute (train_cfg.rpn)
        if data_preprocessor is not None:
            detector["data_preprocessor"] = data_preprocessor
        built = MODELS.build(detector)
        if init_backbone is not None and not isinstance(init_backbone, str):
            raise ConfigError(f"SparseDetector init_backbone={init_backbone!r} is not allowed; use a path or None")
        parts = (parts,) if isinstance(parts, str) else tuple(parts)
        globs = default_exclude(built, parts)
        super().__init__(data_preprocessor=built.data_preprocessor, init_cfg=init_cfg)
        self.detector = built  # the data preprocessor is shared: self.data_preprocessor is the detector's
        self.parts = parts
        self.init_backbone = init_backbone
        if options.get("exclude") is None:
            options["exclude"] = globs
        self.sparsity: SparsityMethod = sparsify(self.detector, input_size=FIRST_FORWARD, **options)
        self.sparsity.exclude_from_ddp(self)

    # --- mmengine's entry points, delegated ---------------------------------------------------
    def forward(self, inputs: Any, data_samples: Any = None, mode: str = "tensor") -> Any:
        """The detector's forward (``mode``: loss | predict | tensor); called by DDP's train step."""
        return self.detector(inputs, data_samples, mode)

    def train_step(self, data: dict | tuple | list, optim_wrapper: Any) -> dict:
        """The detector's train step (preprocess, loss, backward, optimizer step)."""
        return self.detector.train_step(data, optim_wrapper)

    def val_step(self, data: dict | tuple | list) -> list:
        """The detector's prediction step (evaluators get its ``DetDataSample``s)."""
        return self.detector.val_step(data)

    def test_step(self, data: dict | tuple | list) -> list:
        """The detector's prediction step."""
        return self.detector.test_step(data)

    def init_weights(self) -> None:
        """The detector's initialisation (writes reach the dense weights), then ``init_backbone`` when set."""
        if self.is_init:
            super().init_weights()  # mmengine's "called more than once" warning
            return
        with dense_weights(self):
            super().init_weights()
        if self.init_backbone is not None:
            from lbc.detection.backbone import load_backbone  # local: optional module, imported on use

            load_backbone(self, self.init_backbone)


def _sparsity_options(sparsity: Mapping[str, Any] | None) -> dict[str, Any]:
    """Checked copy of the ``sparsity`` dict (None: the dense method)."""
    if sparsity is None:
        return {"method": "dense"}
    if not isinstance(sparsity, Mapping):
        raise ConfigError(f"SparseDetector sparsity={sparsity!r} is not allowed; use a dict of lbc.sparsify "
                          "keywords (method, pattern, ...) or None (dense)")
    options = dict(sparsity)
    if "input_size" in options:
        raise ConfigError("sparsity.input_size is not an option of SparseDetector; layer MACs are measured on the "
                          "detector's first forward")
    return options

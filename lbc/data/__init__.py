"""Data sets, loaders and batch mixup, selected by name from ``configs/data/<name>.yaml``.

API
    build_datasets(name: str, **kwargs) -> Datasets
        ``Datasets(train, val, num_classes, input_size)``; items are ``(float tensor CxHxW, int label)``;
        folder items may be None (an unreadable image: the loader drops and counts it).
    build_loader(dataset, batch_size: int, train: bool, workers: int, seed: int, epoch: int = 0,
                 distributed: bool = False, repeated_aug: int = 0, drop_last: bool | None = None) -> EpochLoader
        A DataLoader with ``set_epoch(epoch)``: batches are a pure function of (seed, epoch, rank), so
        calling ``set_epoch(e)`` before epoch ``e`` (or building with ``epoch=e``) reproduces a resumed
        run. Batches are ``(images, labels)`` without the unreadable images (None items); a batch with
        none left is not yielded. ``loader.skipped``: unreadable images in the epoch being (or last) iterated,
        counted here only (also with workers).
    build_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int,
                prob: float = 1.0, switch_prob: float = 0.5) -> timm.data.Mixup | None
        None when mixup == cutmix == 0 (then smooth labels in the loss); else ``x, y = mix(x, y)`` gives
        soft targets (use SoftTargetCrossEntropy). An odd batch loses its last sample.

Config keys (``configs/data/*.yaml``) and who consumes them:
    top level    -> build_datasets(**data minus ``loader`` and ``augment``): ``name`` and the data set's
                    options (``image_size``, ``root``, ...), plus ``num_classes`` and ``input_size`` ([C, H, W]),
                    which model configs interpolate and build_datasets checks (ConfigError if they disagree).
    ``loader``   -> build_loader(dataset, train=..., seed=cfg.seed, epoch=..., distributed=..., **data.loader):
                    ``batch_size``, ``workers``, ``repeated_aug`` (``drop_last`` optional).
    ``augment``  -> build_mixup(num_classes=data.num_classes, **data.augment): ``mixup``, ``cutmix``,
                    ``label_smoothing`` (``prob``, ``switch_prob`` optional).

Data sets: ``digits`` (sklearn 8x8 digits, fixed 1437/360 split, in memory), ``folder``
(``root/<train_split|val_split>/<class>/<image>``: timm's folder reader and ``create_transform``
recipes), ``synthetic`` (random, deterministic per index).
Adding one = a builder returning Datasets, one ``DATASETS.register`` line here, one config file.
"""

from __future__ import annotations

from typing import Any

from lbc.data.base import Datasets
from lbc.data.digits import build_digits
from lbc.data.folder import build_folder
from lbc.data.loader import Collated, EpochLoader, build_loader, collate
from lbc.data.synthetic import build_synthetic
from lbc.data.transforms import build_mixup
from lbc.registry import Registry

__all__ = ["DATASETS", "Collated", "Datasets", "EpochLoader", "build_datasets", "build_loader", "build_mixup", "collate"]

DATASETS: Registry = Registry("data set")
DATASETS.register("digits")(build_digits)
DATASETS.register("folder")(build_folder)
DATASETS.register("synthetic")(build_synthetic)


def build_datasets(name: str, **kwargs: Any) -> Datasets:
    """Build the data set registered as ``name``; unknown names raise ConfigError naming ``data.name``."""
    return DATASETS.get(name, key="data.name")(**kwargs)

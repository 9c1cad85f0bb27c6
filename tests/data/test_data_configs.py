"""Every data config builds through the documented key split: top level -> build_datasets, loader, augment."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lbc.config import SCHEMAS, CocoDataConfig, TextDataConfig
from lbc.data import build_datasets, build_loader, build_mixup
from tests.data.test_folder import make_tree
from tests.helpers import CONFIGS, compose_config

# Classification data options; coco and coco_shapes (detection) are tested in tests/detection/, the text
# options (task=lm) in tests/lm/.
OPTIONS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml")
                 if not issubclass(SCHEMAS["data"].get(p.stem, object), (CocoDataConfig, TextDataConfig)))


def build_from(overrides: list[str]):
    data = OmegaConf.to_container(compose_config(overrides).data, resolve=True)
    loader_cfg, augment_cfg = data.pop("loader"), data.pop("augment")
    datasets = build_datasets(**data)
    loader = build_loader(datasets.train, train=True, seed=0, **loader_cfg)
    return data, datasets, loader, build_mixup(num_classes=datasets.num_classes, **augment_cfg)


@pytest.mark.parametrize("option", OPTIONS)
def test_data_config_builds_and_its_facts_match_the_data(option, tmp_path):
    overrides = [f"data={option}", "data.loader.workers=0", "data.loader.batch_size=2"]
    if option == "imagenet":
        make_tree(tmp_path, {"ant": 2, "bee": 2}, "train")
        make_tree(tmp_path, {"bee": 1}, "val")
        overrides += [f"data.root={tmp_path}", "data.num_classes=2", "data.image_size=16"]
    if option == "synthetic":
        overrides += ["data.train_size=4", "data.val_size=2", "data.input_size=[3,8,8]"]
    data, datasets, loader, mixup = build_from(overrides)
    assert datasets.num_classes == data["num_classes"] and list(datasets.input_size) == data["input_size"]
    images, labels = next(iter(loader))
    assert tuple(images.shape) == (2, *datasets.input_size) and labels.max() < datasets.num_classes
    assert mixup is None  # the plain configs do not mix


def test_deit_preset_reaches_the_data_builders(tmp_path):
    make_tree(tmp_path, {"ant": 4, "bee": 4}, "train")
    make_tree(tmp_path, {"bee": 1}, "val")
    data, _, loader, mixup = build_from([
        "experiment=deit_small_imagenet", f"data.root={tmp_path}", "data.num_classes=2", "data.image_size=16",
        "data.loader.workers=0", "data.loader.batch_size=4",
    ])
    assert data["rand_augment"] and data["reprob"] > 0 and mixup is not None
    assert len(next(iter(loader))[1]) == 4

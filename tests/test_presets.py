"""The paper presets (``configs/experiment/table{1..6}/``): each composes with its row's recipe, agrees with
``scripts/paper_tables.yaml``, attaches its method, and one row per family and method builds end to end
(ImageNet rows on a tiny folder of the right shape, COCO rows through mmdet's registry). The small-scale
presets (``configs/experiment/small/``): each composes as its ``small`` entry in paper_tables.yaml says.
Also the global batch and the linear lr rule: ``data.loader.global_batch_size`` and ``trainer.auto_scale_lr``."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from timm.data.distributed_sampler import RepeatAugSampler

import lbc
from lbc.config import per_process_batch, scaled_lr, validate
from lbc.engine import trainer
from lbc.engine.optim import phase_lengths
from lbc.errors import ConfigError, DataError
from lbc.models import build_model
from lbc.run.resume import check_resume
from tests.data.test_folder import make_tree
from tests.helpers import CONFIGS, ROOT, TINY, compose_config

EXPERIMENTS = CONFIGS / "experiment"
PRESETS = sorted(str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.glob("table[1-6]/*.yaml"))
PAPER_TABLES = ROOT / "scripts" / "paper_tables.yaml"


def paper_rows() -> dict[str, dict]:
    """preset -> its row in scripts/paper_tables.yaml (rows with a preset; the file must exist)."""
    tables = yaml.safe_load(PAPER_TABLES.read_text())["tables"]
    return {row["preset"]: row for table in tables.values() for row in table["rows"] if row.get("preset")}


@functools.cache
def composed(preset: str, *overrides: str) -> tuple[DictConfig, dict]:
    """The preset's config (data.root filled: the ImageNet/COCO roots are required) and its typed groups."""
    cfg = compose_config([f"experiment={preset}", "data.root=/data", "run_dir=/tmp/lbc-presets", *overrides])
    return cfg, validate(cfg)


def family(cfg: DictConfig) -> str:
    return "detection" if cfg.task.name == "detection" else "deit" if cfg.model.name.startswith("deit") else "resnet"


def test_the_paper_tables_file_and_the_preset_files_name_the_same_presets():
    assert PAPER_TABLES.is_file(), "scripts/paper_tables.yaml (the paper's values) is missing"
    named = set(paper_rows())
    assert named == set(PRESETS), (sorted(named - set(PRESETS)), sorted(set(PRESETS) - named))
    assert len(PRESETS) == 43  # 17 + 5 + 5 + 3 + 8 + 5 rows with a preset


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_carries_its_rows_recipe(preset):
    text = (EXPERIMENTS / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_") and "paper:" in text  # the paper's value is in the header
    cfg, typed = composed(preset)
    row, sp, o, s, t = paper_rows()[preset], typed["sparsity"], typed["optim"], typed["schedule"], typed["trainer"]
    assert sp.method == row["method"]
    if row["pattern"]:
        assert sp.pattern == row["pattern"]
    if row["epochs"]:
        assert s.epochs == row["epochs"]
    if sp.method == "lbc":
        assert sp.criterion == row["criterion"]
        assert sp.removal == ("released" if sp.t_f == 0 else "paper")  # only Table 5's (0, 0) row
        expected = (row["t_i"], row["t_f"]) if preset.startswith("table5/") else (0, s.epochs / 2)
        assert (sp.t_i, sp.t_f) == expected
    if sp.method == "srste":
        assert (sp.t_i, sp.t_f) == ((row["t_i"], row["t_f"]) if preset.startswith("table5/") else (None, None))
    if sp.method == "asp":  # 200 epochs as the paper counts them: the dense baseline's 120, then 80 fine-tuning
        assert (s.epochs, sp.dense_epochs, phase_lengths([("dense", sp.dense_epochs), ("finetune", None)], s.epochs)) \
            == (200, 120, [120.0, 80.0])
    kind = family(cfg)
    if kind == "resnet":
        assert cfg.model.name in ("resnet18", "resnet50") and cfg.data.name == "folder"
        assert (o.name, o.lr, o.momentum, o.weight_decay, t.auto_scale_lr) == ("sgd", 0.1, 0.9, 5e-4, 256)
        assert (s.name, s.warmup_epochs, s.warmup_lr, s.min_lr) == ("cosine", 5, 0.0, 0.0)
        assert s.epochs == (200 if sp.method == "asp" else 120)
        assert (typed["data"].loader.batch_size, typed["data"].loader.global_batch_size) == (None, 256)
        assert typed["data"].augment.label_smoothing == 0.1 and typed["data"].loader.repeated_aug == 0
    elif kind == "deit":
        d = typed["data"]
        assert (o.name, o.lr, o.weight_decay, t.auto_scale_lr, d.loader.global_batch_size) == (
            "adamw", 5e-4, 0.05, 512, 1024)
        assert (s.epochs, s.warmup_epochs, s.warmup_lr, s.min_lr) == (300, 5, 1e-6, 1e-5)
        assert (t.ema, t.ema_decay, d.augment.mixup, d.augment.cutmix, d.augment.label_smoothing) == (
            True, 0.99996, 0.8, 1.0, 0.1)
        assert (d.rand_augment, d.reprob, d.loader.repeated_aug, d.interpolation) == (
            "rand-m9-mstd0.5-inc1", 0.25, 3, "bicubic")
    else:
        assert cfg.model.name == ("faster_rcnn_r50_fpn" if preset.startswith("table2/") else "mask_rcnn_r50_fpn")
        assert (cfg.data.name, typed["data"].batch_size, o.lr, o.weight_decay, t.auto_scale_lr) == (
            "coco", 2, 0.02, 1e-4, 16)
        assert (s.name, s.epochs, s.milestones) == ("step", 12, [8, 11])


# --- the small-scale presets (configs/experiment/small/table{1..6}/, scripts/reproduce.py --scale small) -------
SMALL = sorted(str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.glob("small/table[1-6]/*.yaml"))


def small_rows() -> dict[str, tuple[str, dict]]:
    """small preset -> (its table, its entry under the table's ``small`` in scripts/paper_tables.yaml)."""
    tables = yaml.safe_load(PAPER_TABLES.read_text())["tables"]
    return {row["preset"]: (table_id, row) for table_id, table in tables.items() for row in table.get("small", [])}


@functools.cache
def composed_small(preset: str) -> tuple[DictConfig, dict]:
    cfg = compose_config([f"experiment={preset}", "run_dir=/tmp/lbc-presets"])
    return cfg, validate(cfg)


def test_the_paper_tables_file_and_the_small_preset_files_name_the_same_presets():
    named = small_rows()
    assert set(named) == set(SMALL), (sorted(set(named) - set(SMALL)), sorted(set(SMALL) - set(named)))
    assert len(SMALL) == 36  # 10 + 5 + 5 + 3 + 8 + 5 small-scale rows
    for preset, (table_id, row) in named.items():
        assert preset == f"small/{table_id}/{row['id']}"


@pytest.mark.parametrize("preset", SMALL)
def test_small_preset_composes_as_its_row_says(preset):
    text = (EXPERIMENTS / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_\n# Small Table")  # what it stands for, in the header
    table_id, row = small_rows()[preset]
    cfg, typed = composed_small(preset)
    sp, s = typed["sparsity"], typed["schedule"]
    assert sp.method == row["method"]
    if row["pattern"]:
        assert sp.pattern == row["pattern"]
    if sp.method == "lbc":
        assert sp.criterion == row["criterion"]
        assert sp.removal == ("released" if sp.t_f == 0 else "paper")  # only Table 5's (0, 0) row
    if table_id in ("table2", "table3"):
        assert cfg.task.name == "detection" and cfg.data.name == "coco_shapes"
        assert cfg.model.name == ("faster_rcnn_r18_fpn_shapes" if table_id == "table2" else "mask_rcnn_r18_fpn_shapes")
        assert (s.epochs, s.milestones, typed["optim"].name, typed["optim"].lr) == (6, [4, 5], "adamw", 1e-3)
        assert (cfg.data.train_images, cfg.data.val_images, cfg.data.image_size, cfg.data.batch_size) == (128, 48, 64, 4)
        if sp.method == "lbc":
            assert (sp.t_i, sp.t_f) == (0, 3)
        return
    assert (cfg.model.name, cfg.data.name, cfg.data.image_size, cfg.trainer.progress) == ("resnet_small", "digits", 16, False)
    assert s.epochs == (20 if sp.method == "asp" else 12)
    if sp.method == "asp":  # the paper's 120 dense + 80 fine-tuning, scaled to 12 + 8
        assert sp.dense_epochs == 12
    if table_id == "table5":  # the paper's (t_i, t_f) of 120 epochs, scaled to 12
        paper = {r["id"]: r for r in yaml.safe_load(PAPER_TABLES.read_text())["tables"]["table5"]["rows"]}
        p = paper[row["paper_row"]]
        assert (sp.t_i, sp.t_f) == (p["t_i"] * 12 / 120, p["t_f"] * 12 / 120)
    elif sp.method == "lbc":
        assert (sp.t_i, sp.t_f) == (0, 6)
    elif sp.method == "srste":
        assert (sp.t_i, sp.t_f) == (None, None)


@pytest.mark.parametrize("preset", PRESETS + SMALL)
def test_presets_method_attaches_with_its_options(preset):
    """Every preset's sparsity options are ones its method accepts (on a small net: the options, not the model)."""
    _, typed = composed_small(preset) if preset.startswith("small/") else composed(preset)
    model = build_model(name="resnet_small", num_classes=10, widths=[16, 32, 64], blocks=[1, 1, 1])
    sp = lbc.sparsify(model, **dataclasses.asdict(typed["sparsity"]))
    sp.update(0)
    assert sp.name == typed["sparsity"].method


# --- one row per family and method, built as lbc-train builds it ---------------------------------
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-class ImageNet-layout folder; the presets' transforms make 3 x 224 x 224 inputs of it."""
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root, {"ant": 2, "bee": 2}, "train")
    make_tree(root, {"ant": 1, "bee": 1}, "val")
    return root


# ResNet-50 with the method that costs least to attach (dense) and with LBC; the other ResNet methods on
# ResNet-18 (the same code path, a quarter of the time); DeiT with each sparse method.
BUILT = ["table1/resnet50_dense", "table1/resnet18_asp_2x4", "table1/resnet18_srste_2x4", "table1/resnet50_lbc_2x4",
         "table1/deit_small_srste_2x4", "table1/deit_small_lbc_2x4"]


@pytest.mark.parametrize("preset", BUILT)
def test_classification_preset_builds(preset, imagenet_root, tmp_path, caplog):
    overrides = ["trainer.ema=false"] if preset == "table1/deit_small_srste_2x4" else []  # EMA: the LBC row's
    cfg = compose_config([f"experiment={preset}", f"data.root={imagenet_root}", "data.num_classes=2",
                          "data.loader.workers=0", "data.loader.global_batch_size=2", "schedule.min_lr=0",
                          f"run_dir={tmp_path}", *overrides])  # min_lr 0: DeiT's 1e-5 is above its lr for 2 images
    with caplog.at_level(logging.INFO, logger="lbc"):
        t = trainer.build(cfg)
    try:
        x = next(iter(t.train_loader))[0]
        assert tuple(x.shape) == (2, 3, 224, 224) and t.train_loader.batch_size == 2
        lr = 0.1 * 2 / 256 if cfg.optim.name == "sgd" else 5e-4 * 2 / 512  # the preset's lr, scaled to 2 images
        assert t.optimizer.param_groups[0]["initial_lr"] == pytest.approx(lr)
        assert f"batch 2 = 1 process(es) x 2; lr {lr:g} = optim.lr" in caplog.text
        with torch.no_grad():
            assert t.model(x[:1]).shape == (1, 2)
        method, phases = cfg.sparsity.method, phase_lengths(t.sparsity.phases(), t.epochs)
        assert phases == ([120.0, 80.0] if method == "asp" else [float(t.epochs)])
        if method != "dense":
            assert t.sparsity.report()["scalars"]["density"] <= 1
        if cfg.model.name.startswith("deit"):
            assert t.mixup is not None and isinstance(t.train_loader.order, RepeatAugSampler)
            assert (t.ema is not None) == cfg.trainer.ema
    finally:
        t.release()


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lbc.detection.shapes import make_shapes_coco

    return make_shapes_coco(tmp_path_factory.mktemp("coco") / "shapes", train_images=2, val_images=1, image_size=64)


@pytest.mark.parametrize("preset", ["table2/faster_rcnn_r50_fpn_lbc_2x8", "table3/mask_rcnn_r50_fpn_srste_2x4",
                                    "table3/mask_rcnn_r50_fpn_dense"])
def test_detection_preset_builds_through_mmdet(preset, coco_root):
    pytest.importorskip("mmdet")
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    import lbc.detection.plugin  # noqa: F401  (registers SparseDetector)
    from lbc.detection.config import to_mmengine

    register_all_modules()
    cfg, typed = composed(preset, f"data.root={coco_root}")
    mm = to_mmengine(cfg, typed)
    assert (mm.train_cfg.max_epochs, mm.train_dataloader.batch_size, mm.optim_wrapper.optimizer.lr) == (12, 2, 0.02)
    assert mm.auto_scale_lr == dict(enable=True, base_batch_size=16)
    built = MMDET_MODELS.build(mm.model)
    assert built.detector.backbone.depth == 50 and built.detector.roi_head.bbox_head.num_classes == 80
    assert hasattr(built.detector.roi_head, "mask_head") == preset.startswith("table3/")
    assert mm.model.sparsity["method"] == typed["sparsity"].method


# --- the global batch and the linear lr rule ---------------------------------------------------------
@pytest.mark.parametrize("processes, per_process", [(1, 256), (2, 128), (8, 32)])
def test_global_batch_splits_over_processes_and_the_lr_follows_the_global_batch(processes, per_process):
    _, typed = composed("table1/resnet50_lbc_2x4")
    loader, lr = typed["data"].loader, typed["optim"].lr
    assert per_process_batch(loader.batch_size, loader.global_batch_size, processes) == per_process
    assert scaled_lr(lr, per_process * processes, typed["trainer"].auto_scale_lr) == pytest.approx(0.1)
    _, typed = composed("table1/resnet50_lbc_2x4", "data.loader.global_batch_size=1024")
    assert per_process_batch(None, 1024, processes) == 1024 // processes
    assert scaled_lr(lr, 1024, 256) == pytest.approx(0.4)  # the linear rule: 4x the batch, 4x the lr


def test_per_process_batch_grows_the_global_batch_and_the_scaled_lr():
    _, typed = composed("deit_small_imagenet", "trainer.auto_scale_lr=512")  # 128 per process, lr 1e-3 for 512
    loader = typed["data"].loader
    one, two = (per_process_batch(loader.batch_size, loader.global_batch_size, n) for n in (1, 2))
    assert one == two == 128
    assert scaled_lr(1e-3, one * 1, 512) == pytest.approx(2.5e-4) and scaled_lr(1e-3, two * 2, 512) == pytest.approx(5e-4)
    assert scaled_lr(1e-3, 256, None) == 1e-3  # null: the lr as given, whatever the batch


def test_global_batch_that_does_not_divide_is_one_line():
    with pytest.raises(ConfigError) as err:
        per_process_batch(None, 255, 2)
    assert str(err.value) == ("data.loader.global_batch_size=255 does not divide over 2 processes; use a multiple "
                              "of 2, or another number of processes")
    assert per_process_batch(None, 255, 1) == 255 and per_process_batch(64, None, 2) == 64


@pytest.mark.parametrize("overrides, key", [
    (["data.loader.global_batch_size=256"], "data.loader.global_batch_size=256 are both set"),
    (["data.loader.batch_size=null"], "data.loader.batch_size=None is not allowed"),
    (["data.loader.batch_size=null", "data.loader.global_batch_size=0"], "data.loader.global_batch_size=0 is not"),
    (["trainer.auto_scale_lr=0"], "trainer.auto_scale_lr=0 is not allowed"),
])
def test_bad_batch_settings_are_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_defaults_keep_the_per_process_batch_and_the_lr_as_given(tmp_path, caplog):
    typed = validate(compose_config())
    assert (typed["data"].loader.batch_size, typed["data"].loader.global_batch_size) == (64, None)
    assert typed["trainer"].auto_scale_lr is None
    with caplog.at_level(logging.INFO, logger="lbc"):
        t = trainer.build(compose_config([*TINY, f"run_dir={tmp_path}"]))
    t.release()
    assert t.train_loader.batch_size == 16 and t.optimizer.param_groups[0]["initial_lr"] == 0.1
    assert "batch 16 = 1 process(es) x 16; lr 0.1 (optim.lr)" in caplog.text


def test_a_global_batch_larger_than_the_data_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"^data.loader.global_batch_size=5000 \(5000 per process\) is larger than"):
        trainer.build(compose_config([*TINY, "data.loader.batch_size=null", "data.loader.global_batch_size=5000",
                                      f"run_dir={tmp_path}"]))


def test_auto_scale_lr_scales_a_digits_run_and_a_resume_refuses_changing_it(tmp_path):
    t = trainer.build(compose_config([*TINY, "trainer.auto_scale_lr=64", f"run_dir={tmp_path}"]))
    t.release()
    assert t.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 16 / 64)
    saved = OmegaConf.to_container(compose_config([*TINY, f"run_dir={tmp_path}"]), resolve=True)
    with pytest.raises(ConfigError, match=r"changed trainer.auto_scale_lr \(None -> 64\) cannot be honoured"):
        check_resume(saved, compose_config([*TINY, "trainer.auto_scale_lr=64", f"run_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"schedule.min_lr=0.05 is above the scaled lr 0.025"):
        trainer.build(compose_config([*TINY, "trainer.auto_scale_lr=64", "schedule.min_lr=0.05", f"run_dir={tmp_path}"]))

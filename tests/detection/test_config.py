"""task=detection's Hydra side: every detection model x data option composes, ``to_mmengine`` carries the Hydra
values into mmdet's config (and only those), the models build with mmdet's MODELS, bad values are one line, and
the classification default is untouched."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lbc import config as lbc_config
from lbc.config import SCHEMAS, CocoDataConfig, DetectorConfig, validate
from lbc.detection import config as det_config
from lbc.detection.config import OWNED, flat_cfg_options, owned_values, to_mmengine
from lbc.detection.shapes import CLASSES, make_shapes_coco
from lbc.errors import ConfigError
from tests.helpers import CONFIGS, compose_config, run_cli

MODELS = sorted(o for o, s in SCHEMAS["model"].items() if s is DetectorConfig)
DATA = sorted(o for o, s in SCHEMAS["data"].items() if issubclass(s, CocoDataConfig))
MASK = {o for o in MODELS if o.startswith("mask_rcnn")}
COCO_CLASSES = 80
PAPER = ["task=detection", "model=faster_rcnn_r50_fpn", "data=coco", "data.root=/data/coco", "sparsity=lbc",
         "sparsity.pattern=2:8"]


TINY = {"train_images": 4, "val_images": 2, "image_size": 64}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated COCO-layout set (also a stand-in COCO root: the layout is the same)."""
    return make_shapes_coco(tmp_path_factory.mktemp("data") / "shapes", **TINY)


def detection(*overrides: str, run_dir: Path | str = "/tmp/lbc-test-run") -> tuple:
    cfg = compose_config(["task=detection", f"run_dir={run_dir}", *overrides])
    return cfg, validate(cfg)


def test_option_lists_are_what_the_brief_promises():
    assert MODELS == ["faster_rcnn_r18_fpn_shapes", "faster_rcnn_r50_fpn", "mask_rcnn_r18_fpn_shapes",
                      "mask_rcnn_r50_fpn"]
    assert DATA == ["coco", "coco_shapes"]
    assert {p.stem for p in (CONFIGS / "task").glob("*.yaml")} == {"classification", "detection", "lm"}


def test_task_detection_defaults():
    cfg, typed = detection()
    assert typed["task"].runner == "lbc.detection.runner.run" and typed["task"].name == "detection"
    assert cfg.model.name == "mask_rcnn_r18_fpn_shapes" and typed["model"].depth == 18
    assert cfg.data.name == "coco_shapes" and typed["data"].classes == list(CLASSES)
    assert (typed["optim"].lr, typed["optim"].momentum, typed["optim"].weight_decay) == (0.02, 0.9, 1e-4)
    assert typed["trainer"].auto_scale_lr is None and typed["trainer"].device == "auto"
    assert typed["trainer"].max_keep_checkpoints == 2
    # the shapes set's own take on step_1x (schedule/for_data/coco_shapes_step_1x.yaml) ...
    assert (typed["schedule"].epochs, typed["schedule"].milestones, typed["schedule"].warmup_iters) == (6, [4, 5], 50)
    # ... which the command line still overrides; LBC's t_f follows: half the detection epochs
    _, typed = detection("schedule.epochs=12", "schedule.milestones=[8,11]")
    assert typed["schedule"].epochs == 12 and typed["sparsity"].t_f == 6


def test_the_papers_command_composes_with_mmdets_1x():
    cfg = compose_config(PAPER)
    typed = validate(cfg)
    assert cfg.model.mmdet_config == "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py" and typed["model"].depth == 50
    assert typed["data"].root == "/data/coco" and typed["data"].classes is None and typed["data"].batch_size == 2
    s = typed["schedule"]
    assert (s.epochs, s.milestones, s.gamma, s.warmup_iters, s.warmup_ratio) == (12, [8, 11], 0.1, 500, 0.001)
    assert typed["sparsity"].method == "lbc" and typed["sparsity"].pattern == "2:8" and typed["sparsity"].t_f == 6
    assert (typed["optim"].lr, typed["optim"].weight_decay) == (0.02, 1e-4)


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_to_mmengine_carries_the_hydra_values(model, data, shapes_root, tmp_path):
    cfg, typed = detection(f"model={model}", f"data={data}", f"data.root={shapes_root}", "data.batch_size=3",
                           "data.num_workers=1", "optim.lr=0.01", "schedule.epochs=5", "schedule.milestones=[3]",
                           "sparsity.pattern=2:8", "seed=7", "trainer.log_interval=5", "trainer.max_keep_checkpoints=2",
                           run_dir=tmp_path / "run")
    mm = to_mmengine(cfg, typed)
    classes = list(CLASSES) if data == "coco_shapes" else None
    n = len(classes) if classes else COCO_CLASSES

    assert mm.work_dir == str(tmp_path / "run")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = mm[loader].dataset
        assert ds.data_root == str(shapes_root)
        assert len(ds.metainfo.classes) == n and (classes is None or list(ds.metainfo.classes) == classes)
        assert mm[loader].num_workers == 1 and mm[loader].persistent_workers is True
        resize = [t for t in ds.pipeline if t.type == "Resize"]
        assert resize and all(tuple(t.scale) == tuple(typed["data"].image_scale) for t in resize)
    assert mm.train_dataloader.dataset.ann_file == "annotations/instances_train2017.json"
    assert mm.val_dataloader.dataset.data_prefix.img == "val2017/"
    assert mm.train_dataloader.batch_size == 3
    assert mm.val_evaluator.ann_file == str(shapes_root / "annotations" / "instances_val2017.json")
    assert ("segm" in mm.val_evaluator.metric) == (model in MASK)  # mmdet's metric list, as shipped

    assert mm.train_cfg.max_epochs == 5 and mm.train_cfg.val_interval == 1
    warmup, step = mm.param_scheduler
    assert (warmup.type, warmup.end, warmup.start_factor) == ("LinearLR", typed["schedule"].warmup_iters, 0.001)
    assert (step.type, step.milestones, step.gamma, step.end) == ("MultiStepLR", [3], 0.1, 5)
    assert mm.optim_wrapper.optimizer == dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=False)
    assert mm.optim_wrapper.type == "OptimWrapper"
    assert mm.optim_wrapper.constructor == "SparsityOptimWrapperConstructor"
    assert mm.auto_scale_lr.enable is False

    assert mm.model.type == "SparseDetector"
    assert mm.model.sparsity == dataclasses.asdict(typed["sparsity"]) and mm.model.sparsity["pattern"] == "2:8"
    assert mm.model.parts == ["backbone"] and mm.model.init_backbone is None
    det = mm.model.detector
    depth = typed["model"].depth
    assert det.backbone.depth == depth and det.backbone.init_cfg is None  # random: nothing downloaded
    assert (det.backbone.frozen_stages, det.backbone.norm_eval) == (-1, False)
    assert det.neck.in_channels == ([64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048])
    assert det.roi_head.bbox_head.num_classes == n
    if model in MASK:
        assert det.roi_head.mask_head.num_classes == n
    if model.endswith("_shapes"):  # the shapes models' smaller heads come from cfg_options
        assert det.neck.out_channels == 64 and det.rpn_head.in_channels == 64

    assert [h.type for h in mm.custom_hooks] == ["SparsityHook"] and mm.custom_hooks[0].log_interval == 5
    assert "lbc.detection.plugin" in mm.custom_imports.imports
    assert mm.default_hooks.logger.interval == 5
    assert (mm.default_hooks.checkpoint.interval, mm.default_hooks.checkpoint.max_keep_ckpts) == (1, 2)
    assert mm.default_hooks.checkpoint.save_last is True
    assert {b.type for b in mm.visualizer.vis_backends} == {"LocalVisBackend", "TensorboardVisBackend"}
    assert "name" not in mm.visualizer
    assert mm.env_cfg.dist_cfg.backend == "gloo"  # this machine has no CUDA: trainer.device=auto is the CPU
    assert mm.randomness == dict(seed=7, deterministic=False)
    assert mm.resume is False and mm.load_from is None and mm.launcher == "none"


def test_only_owned_keys_differ_from_mmdets_file(shapes_root):
    """Every key to_mmengine sets is in the OWNED table (a row of the docstring), and nothing else changes."""
    from mmengine.config import Config

    cfg, typed = detection(f"data.root={shapes_root}", "model=mask_rcnn_r50_fpn")
    shipped = Config.fromfile(str(det_config.resolve_mmdet_config(typed["model"].mmdet_config)))
    values = owned_values(cfg, typed, shipped)
    for key in values:
        assert det_config._owner(key) is not None, f"{key} is set but not in OWNED"
    mm = to_mmengine(cfg, typed)
    changed = _diff(shipped.to_dict(), {**mm.to_dict(), "model": mm.model.detector.to_dict()})
    assert changed, "nothing was set"
    for key in changed:
        assert det_config._owner(key) is not None, f"{key} changed but Hydra does not own it"


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [k for i, (x, y) in enumerate(zip(a, b, strict=True)) for k in _diff(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


def test_the_docstring_table_is_the_owned_table():
    table = {}
    for line in det_config.__doc__.splitlines():
        match = re.match(r"^(\S.*?)\s{2,}(\S.*)$", line)
        if match and not line.startswith("=") and match.group(1) != "Hydra key":
            table.setdefault(match.group(1), []).append(match.group(2))
    hydra_keys = {hydra for hydra, _ in OWNED}
    assert hydra_keys <= set(table) | {"(lbc)"}, hydra_keys - set(table)
    assert set(table) - {"model.cfg_options"} <= hydra_keys, set(table) - hydra_keys


@pytest.mark.parametrize("model", MODELS)
def test_every_detection_model_builds_with_mmdets_registry(model, shapes_root):
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules

    import lbc.detection.plugin  # noqa: F401  (registers SparseDetector)

    register_all_modules()
    cfg, typed = detection(f"model={model}", f"data.root={shapes_root}", "sparsity=dense")
    mm = to_mmengine(cfg, typed)
    built = MMDET_MODELS.build(mm.model)
    assert type(built).__name__ == "SparseDetector"
    assert built.detector.backbone.depth == typed["model"].depth
    assert built.detector.roi_head.bbox_head.num_classes == len(CLASSES)
    assert hasattr(built.detector.roi_head, "mask_head") == (model in MASK)


def test_overrides_reach_mmengine(shapes_root):
    cfg, typed = detection(f"data.root={shapes_root}", "model.depth=34", "optim=adamw", "optim.lr=1e-4",
                           "schedule.warmup_iters=0", "trainer.auto_scale_lr=16", "data.image_scale=[96,80]",
                           "model.sparsify_parts=[backbone,neck]", "sparsity=srste", "data.num_workers=0")
    mm = to_mmengine(cfg, typed)
    assert mm.model.detector.backbone.depth == 34 and mm.model.detector.neck.in_channels == [64, 128, 256, 512]
    assert mm.optim_wrapper.optimizer.type == "AdamW" and mm.optim_wrapper.optimizer.lr == 1e-4
    assert [s.type for s in mm.param_scheduler] == ["MultiStepLR"]
    assert mm.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert tuple(mm.train_dataloader.dataset.pipeline[2].scale) == (96, 80)
    assert mm.model.parts == ["backbone", "neck"] and mm.model.sparsity["method"] == "srste"
    assert mm.train_dataloader.persistent_workers is False


def test_cfg_options_reach_mmdets_keys_nested_or_dotted(shapes_root):
    cfg, typed = detection(f"data.root={shapes_root}", "model.cfg_options.model.rpn_head.feat_channels=32",
                           "+model.cfg_options.train_dataloader.dataset.pipeline.3.prob=0.25",
                           "+model.cfg_options.default_hooks.timer.type=IterTimerHook")
    mm = to_mmengine(cfg, typed)
    assert mm.model.detector.rpn_head.feat_channels == 32  # the YAML's 64, overridden on the command line
    assert mm.model.detector.rpn_head.in_channels == 64
    assert mm.train_dataloader.dataset.pipeline[3].prob == 0.25
    assert flat_cfg_options({"a": {"b": 1, "c.d": [1, 2]}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


@pytest.mark.parametrize("key, owner", [
    ("model.cfg_options.train_dataloader.batch_size=8", "data.batch_size"),
    ("model.cfg_options.model.backbone.depth=101", "model.depth"),
    ("model.cfg_options.param_scheduler.0.end=10", "schedule."),
    ("model.cfg_options.optim_wrapper.optimizer.lr=0.1", "optim."),
    ("model.cfg_options.model.roi_head.bbox_head.num_classes=5", "data.classes"),
    ("model.cfg_options.work_dir=/tmp/x", "run_dir"),
    ("model.cfg_options.custom_hooks=[]", "trainer.log_interval"),
])
def test_a_key_hydra_owns_is_refused_in_cfg_options(key, owner, shapes_root):
    cfg, typed = detection(f"data.root={shapes_root}", "+" + key)
    with pytest.raises(ConfigError) as e:
        to_mmengine(cfg, typed)
    assert owner in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_in_the_run_dir_turns_on_resume(shapes_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg, typed = detection(f"data.root={shapes_root}", run_dir=run_dir)
    assert to_mmengine(cfg, typed).resume is False
    (run_dir / "epoch_1.pth").write_bytes(b"x")
    (run_dir / "last_checkpoint").write_text(str(run_dir / "epoch_1.pth"))
    assert to_mmengine(cfg, typed).resume is True


# --- bad values: one line, exit 2, nothing left behind (through the real CLI) ------------------------------
BAD = [
    (["data=coco"], "data.root is required"),
    (["data=coco", "data.root=/nonexistent/coco"], "/nonexistent/coco"),
    (["model.backbone_init=torchvision"], "model.backbone_init"),
    (["model.backbone_init=/nonexistent.pth"], "model.backbone_init=/nonexistent.pth"),
    (["model.sparsify_parts=[backbone,head]"], "model.sparsify_parts"),
    (["model.depth=20"], "model.depth"),
    (["model.mmdet_config=nope/nope.py"], "model.mmdet_config=nope/nope.py"),
    (["schedule.milestones=[11,8]"], "schedule.milestones"),
    (["schedule.milestones=[13]", "schedule.epochs=12"], "schedule.milestones"),
    (["schedule.epochs=0"], "schedule.epochs"),
    (["schedule.gamma=2"], "schedule.gamma"),
    (["schedule.warmup_ratio=0"], "schedule.warmup_ratio"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.device=cuda"], "trainer.device=cuda"),
    (["trainer.amp=true"], "trainer.amp"),
    (["trainer.val_interval=0"], "trainer.val_interval"),
    (["trainer.max_keep_checkpoints=0"], "trainer.max_keep_checkpoints"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.image_scale=[800]"], "data.image_scale"),
    (["data.train_images=0"], "data.train_images"),
    (["data.nope=1"], "data.nope"),
    (["model=nope"], "model=nope"),
    (["schedule=cosine"], "schedule=cosine"),
    (["+model.cfg_options.train_dataloader.batch_size=8"], "data.batch_size"),
    (["sparsity.pattern=4:4"], "sparsity.pattern"),
    (["task.runner=lbc.nope.run"], "task.runner"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_value_is_one_line_and_exit_2(overrides, key, shapes_root, tmp_path):
    data = [] if any(o.startswith("data=") for o in overrides) else \
        [f"data.root={shapes_root}", *(f"data.{k}={v}" for k, v in TINY.items())]
    code, out, err = run_cli("task=detection", *data, *overrides, f"run_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:], out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run").exists()  # a failed start leaves no folder


def test_a_missing_annotation_file_is_named(shapes_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(shapes_root, root)
    (root / "annotations" / "instances_val2017.json").unlink()
    code, _, err = run_cli("task=detection", "data=coco", f"data.root={root}", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and err.count("\n") == 1 and "instances_val2017.json is missing" in err, err


# --- the classification default is untouched ---------------------------------------------------------------


def test_classification_default_config_is_todays_plus_the_task(tmp_path):
    """``lbc-train --cfg job``: the same as composing without the task group (today's defaults list), plus
    ``task: {name: classification, runner: lbc.engine.trainer.run}`` and nothing else."""
    code, out, err = run_cli("--cfg", "job")
    assert code == 0, err
    now = OmegaConf.create(out)
    old_dir = tmp_path / "configs"
    shutil.copytree(CONFIGS, old_dir)
    train = (old_dir / "train.yaml").read_text()
    old = "\n".join(ln for ln in train.splitlines()
                    if not re.match(r"\s+- (task|optional schedule/for_data|optional sparsity/for_task)", ln))
    assert old != train
    (old_dir / "train.yaml").write_text(old + "\n")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(old_dir), version_base="1.3"):
        before = compose(config_name="train")
    assert OmegaConf.to_container(now.task) == {"name": "classification", "runner": "lbc.engine.trainer.run"}
    now_rest = {k: v for k, v in OmegaConf.to_container(now).items() if k not in ("task", "run_dir")}
    before_rest = {k: v for k, v in OmegaConf.to_container(before).items() if k not in ("task", "run_dir")}
    assert now_rest == before_rest
    assert OmegaConf.is_missing(before, "task")  # only the new group sets it
    assert validate(compose_config())["optim"].lr == 0.1 and lbc_config.SCHEMAS["schedule"]["cosine"]


def test_under_torchrun_on_cpu_the_ddp_wrapper_takes_no_device_ids(shapes_root, monkeypatch):
    """mmengine's default wrapper passes device_ids=[LOCAL_RANK], which DDP refuses for a CPU model."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg, typed = detection(f"data.root={shapes_root}", "trainer.device=cpu")
    mm = to_mmengine(cfg, typed)
    assert mm.launcher == "pytorch" and mm.env_cfg.dist_cfg.backend == "gloo"
    assert mm.model_wrapper_cfg.type == "MMDistributedDataParallel" and mm.model_wrapper_cfg.device_ids is None

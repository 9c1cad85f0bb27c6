"""The MMDetection plugin (``lbc.detection.plugin``) through mmengine's own Runner: SparseDetector, SparsityHook,
SparsityOptimWrapperConstructor and weights-only checkpoints, on mmdet's shipped Faster / Mask R-CNN configs shrunk
to a ResNet-18 and the generated shapes set."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mmdet.registry import HOOKS, MODELS
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from torch.nn.utils import parametrize

import lbc.detection.plugin  # noqa: F401  (registers the components)
from lbc.detection.checkpoint import mmengine_safe_globals
from lbc.detection.hook import SparsityHook, find_sparsity
from lbc.detection.model import SparseDetector
from lbc.errors import ConfigError
from lbc.sparsity.nm import is_exactly_nm
from tests.detection.mmdet_helpers import CLASSES, SHIPPED, detection_config, small_detector
from tests.helpers import PYTHON, ROOT

# The smallest setting found in which the mAP rises clearly (seeded): 128 images of 64 px, batch 4, AdamW 1e-3
# with 20 warm-up steps (from scratch, SGD 0.02 was no faster and 0.04 collapsed); Faster 3 epochs, Mask 4.
# Measured: Faster bbox mAP 0.001 -> 0.053 (mAP_50 0.004 -> 0.143); Mask bbox 0.000 -> 0.073 (0.001 -> 0.204),
# segm 0.000 -> 0.053 (0.000 -> 0.168). Fewer steps leave it near 0.01 (Faster after 2 epochs: 0.010).
MAP_DATA = {"train_images": 128, "val_images": 24, "image_size": 64, "max_objects": 3, "seed": 0}
MAP_SCHEDULE = {"mask": (4, 2)}  # (epochs, t_f)
MAP_OPTIMIZER = {"type": "AdamW", "lr": 1e-3, "weight_decay": 0.05}
TINY_DATA = {"train_images": 8, "val_images": 4, "image_size": 64, "max_objects": 3, "seed": 0}
DENSE_PARTS = ("neck", "rpn_head", "roi_head")


@pytest.fixture(scope="module")
def map_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lbc.detection.shapes import make_shapes_coco

    return make_shapes_coco(tmp_path_factory.mktemp("shapes") / "map", **MAP_DATA)


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lbc.detection.shapes import make_shapes_coco

    return make_shapes_coco(tmp_path_factory.mktemp("shapes") / "tiny", **TINY_DATA)


@HOOKS.register_module(force=True)
class _ProbeHook(Hook):
    """Test probe: the method's epoch after each train() call's first iteration, and the scores once ``freeze_at``
    (an iteration) is reached."""

    priority = "LOW"  # after SparsityHook

    def __init__(self, freeze_at: int | None = None) -> None:
        self.freeze_at = freeze_at
        self.first_epochs: list[float] = []
        self.frozen: dict[str, torch.Tensor] | None = None
        self.requires_grad: list[bool] = []
        self._first = True

    def before_train(self, runner: Any) -> None:
        self._first = True

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        sp = find_sparsity(runner.model)
        if self._first:
            self.first_epochs.append(sp.epoch)
            self._first = False
        if self.freeze_at is not None and runner.iter + 1 == self.freeze_at:  # runner.iter: this iteration
            self.requires_grad = [s.requires_grad for s in sp.score_parameters()]
            self.frozen = {str(i): s.detach().clone() for i, s in enumerate(sp.score_parameters())}


def probe(runner: Runner) -> _ProbeHook:
    return next(h for h in runner.hooks if isinstance(h, _ProbeHook))


def metrics(work_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def assert_backbone_nm(runner: Runner) -> None:
    """The backbone (but its stem) is exactly 2:4; the stem, neck and heads stay dense."""
    model = runner.model
    sp = model.sparsity
    assert sp.is_exact_nm() and sp.report()["scalars"]["exact_nm"] == 1.0
    masks = sp.masks()
    assert masks and all(is_exactly_nm(m.bool(), sp.pattern) for m in masks.values())
    convs = {n for n, m in model.detector.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert {f"backbone.{n}" for n in convs - {"conv1"}} == set(sp.layers)
    assert not parametrize.is_parametrized(model.detector.backbone.conv1, "weight")
    for part in DENSE_PARTS:
        assert not any(parametrize.is_parametrized(m) for m in model.detector.get_submodule(part).modules()), part


# --- the model, without training ------------------------------------------------------------------------------


def build(kind: str = "faster", **kwargs: Any) -> SparseDetector:
    cfg = detection_config(kind, Path("/nonexistent"), Path("/nonexistent"))
    from mmengine.registry import DefaultScope

    if not DefaultScope.check_instance_created("lbc-test"):
        DefaultScope.get_instance("lbc-test", scope_name="mmdet")
    return MODELS.build({**cfg.model.to_dict(), **kwargs})


def test_default_parts_stem_and_init_reach_dense_weights():
    model = build(sparsity={"method": "lbc", "pattern": "2:4", "t_f": 1})
    backbone = model.detector.backbone
    assert set(model.sparsity.exclude) == {*DENSE_PARTS, "backbone.conv1"}
    assert model.data_preprocessor is model.detector.data_preprocessor
    conv = backbone.layer1[0].conv1
    before = conv.parametrizations.weight.original.detach().clone()
    model.init_weights()  # mmengine's Kaiming init writes into module.weight: it must reach the stored weight
    after = conv.parametrizations.weight.original
    assert not torch.equal(before, after) and parametrize.is_parametrized(conv, "weight")
    std = after.std().item()  # Kaiming normal, fan_out, relu: sqrt(2 / (64 * 9))
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.01
    assert torch.equal(model.state_dict()["detector.backbone.layer1.0.conv1.weight"], after)

    # load_from a plain mmdet checkpoint (keys backbone.*, neck.*, ...): the hook adds the wrapper's prefix
    plain = {"state_dict": {k.removeprefix("detector."): v for k, v in model.state_dict().items()}}
    SparsityHook().after_load_checkpoint(SimpleNamespace(model=model), plain)
    assert plain["state_dict"].keys() == model.state_dict().keys()

    neck = build(sparsity={"method": "lbc", "pattern": "2:4", "t_f": 1}, parts=["backbone", "neck"])
    assert any(name.startswith("neck.") for name in neck.sparsity.layers)
    dense = build()
    assert dense.sparsity.name == "dense"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"parts": ["backbone", "nekc"]}, "parts='nekc'"),
    ({"parts": []}, "parts=()"),
    ({"sparsity": "lbc"}, "sparsity='lbc'"),
    ({"sparsity": {"method": "nope"}}, "sparsity.method"),
    ({"sparsity": {"method": "lbc"}}, "sparsity.t_f"),
    ({"sparsity": {"method": "lbc", "t_f": 1, "pattern": "4:2"}}, "sparsity.pattern"),
    ({"sparsity": {"method": "lbc", "t_f": 1, "input_size": [3, 64, 64]}}, "sparsity.input_size"),
    ({"detector": "MaskRCNN"}, "detector="),
])
def test_bad_arguments_are_one_line_config_errors(kwargs: dict, needle: str):
    with pytest.raises(ConfigError) as err:
        build(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_optimizer_holds_every_score_once_with_the_method_decay():
    from mmengine.optim import build_optim_wrapper

    sgd = {"type": "SGD", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4}
    cases = [  # (score_weight_decay, optimizer, paramwise_cfg, the scores' weight decay)
        (None, sgd, None, 1e-4),
        (None, sgd, {"norm_decay_mult": 0.0, "bias_decay_mult": 0.0}, 1e-4),
        (0.0, sgd, {"norm_decay_mult": 0.0}, 0.0),
        (None, {"type": "AdamW", "lr": 1e-3}, None, 0.01),  # AdamW's own default decay
    ]
    model = build(sparsity={"method": "lbc", "pattern": "2:4", "t_f": 1})
    scores = {id(s) for s in model.sparsity.score_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert scores < trainable and len(scores) == len(model.sparsity.layers)
    for score_decay, optimizer_cfg, paramwise, want in cases:
        model.sparsity.score_weight_decay = score_decay
        cfg = {"constructor": "SparsityOptimWrapperConstructor", "optimizer": optimizer_cfg}
        if paramwise:
            cfg["paramwise_cfg"] = paramwise
        optimizer = build_optim_wrapper(model, cfg).optimizer
        seen = [id(p) for g in optimizer.param_groups for p in g["params"]]
        assert len(seen) == len(set(seen)) and set(seen) == trainable  # every parameter exactly once
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids & scores:
                assert ids <= scores and group["weight_decay"] == want  # score groups hold scores only
        if paramwise:  # mmengine's rules still apply to the model's own parameters
            norm = model.detector.backbone.bn1.weight
            group = next(g for g in optimizer.param_groups if any(p is norm for p in g["params"]))
            assert group["weight_decay"] == 0.0


# --- training through mmengine's Runner ---------------------------------------------------------------------


@pytest.mark.slow
def test_lbc_map_rises_backbone_ends_2_4_scores_freeze(map_shapes: Path, tmp_path: Path):
    """Mask R-CNN (its box branch is Faster R-CNN's; Faster R-CNN itself trains in the SR-STE/ASP, resume and
    export tests): bbox and segm mAP rise well above the untrained model's under LBC 2:4."""
    kind, work = "mask", tmp_path / "run"
    epochs, t_f = MAP_SCHEDULE[kind]
    cfg = detection_config(kind, map_shapes, work, sparsity={"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": t_f},
                           epochs=epochs, optimizer=MAP_OPTIMIZER, image_size=MAP_DATA["image_size"])
    iters_per_epoch = MAP_DATA["train_images"] // 4
    cfg.custom_hooks.append({"type": "_ProbeHook", "freeze_at": t_f * iters_per_epoch + 1})
    runner = Runner.from_cfg(cfg)
    runner.model.init_weights()
    untrained = runner.val()  # the same runner and evaluator, before any step
    with mmengine_safe_globals():
        runner.train()

    lines = metrics(work)
    assert [ln["epoch"] for ln in lines] == list(range(epochs + 1))  # the untrained line, then one per epoch
    for ln in lines:
        assert {"coco/bbox_mAP", "sparsity/density", "sparsity/exact_nm", "sparsity/train_flops_ratio",
                "sparsity/alive_per_group"} <= ln.keys()
    keys = ["coco/bbox_mAP", "coco/bbox_mAP_50"] + (["coco/segm_mAP", "coco/segm_mAP_50"] if kind == "mask" else [])
    trained = lines[-1]
    print(kind, {k: (untrained[k], trained[k]) for k in keys})
    for key in keys:
        assert trained[key] >= 5 * untrained[key] + 0.01, (key, untrained[key], trained[key])
    assert lines[0]["sparsity/alive_per_group"] == 6 and trained["sparsity/alive_per_group"] == 1
    assert trained["sparsity/exact_nm"] == 1
    assert_backbone_nm(runner)

    # after t_f the scores are frozen (no gradient, unchanged) and training went on (weights moved)
    seen = probe(runner)
    assert seen.requires_grad and not any(seen.requires_grad)
    scores = runner.model.sparsity.score_parameters()
    assert all(torch.equal(seen.frozen[str(i)], s) for i, s in enumerate(scores))
    assert runner.iter == epochs * iters_per_epoch


@pytest.mark.slow
@pytest.mark.parametrize(("method", "options", "epochs"), [
    ("srste", {}, 1),
    ("asp", {"dense_epochs": 1}, 2),
])
def test_srste_and_asp_end_nm(method: str, options: dict, epochs: int, tiny_shapes: Path, tmp_path: Path):
    cfg = detection_config("faster", tiny_shapes, tmp_path / "run", epochs=epochs,
                           sparsity={"method": method, "pattern": "2:4", **options})
    runner = Runner.from_cfg(cfg)
    with mmengine_safe_globals():
        runner.train()
    assert runner.iter == epochs * 2
    assert_backbone_nm(runner)
    if method == "asp":  # the stored pruned weights are zero
        for name, mask in runner.model.sparsity.masks().items():
            layer = runner.model.detector.get_submodule(name.removesuffix(".weight"))
            assert not layer.parametrizations.weight.original[mask == 0].any()
    assert len(metrics(tmp_path / "run")) == epochs


def _model_state(runner: Runner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in runner.model.state_dict().items()}


@pytest.mark.slow
def test_resume_continues_exactly_and_checkpoints_load_weights_only(tiny_shapes: Path, tmp_path: Path):
    epochs, stop = 2, 1  # 2 iterations per epoch; candidates removed at every step until epoch 1.5
    sparsity = {"method": "lbc", "pattern": "2:4", "t_i": 0, "t_f": 1.5, "update_every": "step"}

    def config(work: Path, max_epochs: int, resume: bool = False) -> Any:
        cfg = detection_config("faster", tiny_shapes, work, sparsity=sparsity, epochs=max_epochs,
                               checkpoint_interval=1)
        cfg.custom_hooks.append({"type": "_ProbeHook"})
        cfg.resume = resume
        return cfg

    whole = Runner.from_cfg(config(tmp_path / "whole", epochs))
    with mmengine_safe_globals():
        whole.train()

    first = Runner.from_cfg(config(tmp_path / "cut", stop))  # stopped after epoch 1, its checkpoint written
    with mmengine_safe_globals():
        first.train()
    checkpoint = tmp_path / "cut" / f"epoch_{stop}.pth"

    # weights-only: mmengine's own loaders fail outside the context with torch's error, succeed inside
    from mmengine.runner import load_checkpoint

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(first.model, str(checkpoint), map_location="cpu")
    with mmengine_safe_globals():
        raw = torch.load(checkpoint, weights_only=True)
    assert raw["lbc_sparsity"]["method"] == "lbc" and 0 < raw["lbc_sparsity"]["removed"] < 5

    resumed = Runner.from_cfg(config(tmp_path / "cut", epochs, resume=True))
    with mmengine_safe_globals():
        resumed.train()
    # the first resumed iteration advanced the schedule to the resumed iteration, not to 0
    assert probe(resumed).first_epochs == [stop]
    assert probe(whole).first_epochs == [0]

    a, b = whole.model.sparsity, resumed.model.sparsity
    assert a.state_dict() == b.state_dict() and a.state_dict()["removed"] == 5
    assert a.masks().keys() == b.masks().keys()
    assert all(torch.equal(a.masks()[k], b.masks()[k]) for k in a.masks())
    sa, sb = _model_state(whole), _model_state(resumed)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith(("alive", "mask", "scores"))), "sparsity tensors"
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "a resumed run continues bit for bit"


@pytest.mark.slow
def test_plain_mmdet_config_file_trains_with_mmdet_entry(tiny_shapes: Path, tmp_path: Path):
    """What the README shows MMDetection users: their config file, four added lines, mmengine's Runner."""
    root = f"{tiny_shapes}/"
    pipeline = textwrap.dedent("""\
        [dict(type='LoadImageFromFile'),
         dict(type='LoadAnnotations', with_bbox=True),
         dict(type='Resize', scale=(64, 64), keep_ratio=True),
         dict(type='PackDetInputs')]""")
    loader = ("dict(batch_size=4, num_workers=0, persistent_workers=False, batch_sampler=None, dataset=dict("
              "data_root={root!r}, metainfo=dict(classes={classes!r}), ann_file='annotations/instances_{split}2017.json', "
              "data_prefix=dict(img='{split}2017/'), pipeline=pipeline))")
    head = f"""\
_base_ = {str(SHIPPED['faster'])!r}
custom_imports = dict(imports=['lbc.detection.plugin'], allow_failed_imports=False)
model = dict(_delete_=True, type='SparseDetector', detector=DETECTOR, sparsity=dict(method='lbc', pattern='2:4', T_F))
custom_hooks = [dict(type='SparsityHook')]
optim_wrapper = dict(constructor='SparsityOptimWrapperConstructor')
"""
    # the README's form: the shipped detector as it is ({{_base_.model}}: a ResNet-50 with ImageNet weights)
    readme = tmp_path / "readme.py"
    readme.write_text(head.replace("DETECTOR", "{{_base_.model}}").replace("T_F", "t_f=6"))
    parsed = Config.fromfile(str(readme))
    assert parsed.model.keys() == {"type", "detector", "sparsity"} and parsed.model.detector.backbone.depth == 50
    assert parsed.optim_wrapper.optimizer.type == "SGD" and parsed.custom_hooks[0].type == "SparsityHook"
    # here: the shrunk detector, our data, one epoch of two steps (candidates removed at each: N:M at the val)
    detector = repr(_merged_detector(small_detector("faster")))
    text = head.replace("DETECTOR", detector).replace("T_F", "t_f=0.5, update_every='step'") + f"""\
pipeline = {pipeline}
train_dataloader = {loader.format(root=root, classes=CLASSES, split='train')}
val_dataloader = {loader.format(root=root, classes=CLASSES, split='val')}
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={root + 'annotations/instances_val2017.json'!r})
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
work_dir = {str(tmp_path / 'run')!r}
"""
    path = tmp_path / "faster_rcnn_r18_lbc_2to4_shapes.py"
    path.write_text(text)
    script = ("from mmengine.config import Config; from mmengine.runner import Runner; "
              f"Runner.from_cfg(Config.fromfile({str(path)!r})).train()")
    proc = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "sparsity/alive_per_group" in log and "sparsity lbc 2:4 at epoch 1:" in log
    lines = metrics(tmp_path / "run")
    assert len(lines) == 1 and lines[0]["sparsity/exact_nm"] == 1.0 and "coco/bbox_mAP" in lines[0]
    with mmengine_safe_globals():
        saved = torch.load(tmp_path / "run" / "epoch_1.pth", weights_only=True)
    assert saved["lbc_sparsity"]["removed"] == 5


def _merged_detector(overrides: dict[str, Any]) -> dict[str, Any]:
    base = Config.fromfile(str(SHIPPED["faster"])).model.to_dict()

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    merged = merge(base, overrides)
    merged["rpn_head"]["anchor_generator"]["scales"] = [4]
    return merged


@pytest.mark.slow
def test_two_process_gloo_run_scores_freeze_without_rebuilding_ddp(tiny_shapes: Path, tmp_path: Path):
    """mmengine's DDP wrapper around a SparseDetector: the ranks end identical (weights, masks, scores: score
    gradients are averaged by the method), the scores freeze at t_f without a new wrapper, rank 0 writes the
    metrics."""
    work = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.detection.mmdet_helpers", str(tiny_shapes), str(work)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [torch.load(work / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["wrapper"] == "MMDistributedDataParallel" and r["iter"] == 4 and r["exact"] for r in ranks)
    assert all(r["frozen"] and all(r["frozen"]) for r in ranks)
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and sum(k.endswith(("alive", "mask", "scores")) for k in a) == 3 * 19
    # BN running statistics are rank 0's as of the last forward's broadcast, then updated locally: not compared
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(("running_mean", "running_var")))
    assert [ln["epoch"] for ln in metrics(work)] == [1, 2]  # rank 0 only

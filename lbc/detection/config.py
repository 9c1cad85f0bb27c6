"""The composed Hydra config of a detection job as an mmengine ``Config`` (:func:`to_mmengine`).

MMDetection's shipped config file (``model.mmdet_config``) is the home of every value Hydra does not
name; it is loaded with ``mmengine.Config.fromfile``, never copied. Hydra is the home of what users
change, and :func:`to_mmengine` writes exactly these keys (``OWNED`` in the code, this table here;
a test keeps the two equal):

==============================================  ========================================================================
Hydra key                                       mmdet / mmengine key
==============================================  ========================================================================
run_dir                                         work_dir
data.root                                       {train,val,test}_dataloader.dataset.data_root
data.root (COCO layout)                         {train,val,test}_dataloader.dataset.ann_file, .data_prefix.img
data.root (COCO layout)                         {val,test}_evaluator.ann_file (CocoMetric; bbox, and segm for Mask R-CNN)
data.classes                                    {train,val,test}_dataloader.dataset.metainfo.classes
data.classes (their number)                     every model.**.num_classes (bbox_head, mask_head)
data.batch_size                                 train_dataloader.batch_size
data.val_batch_size                             {val,test}_dataloader.batch_size
data.num_workers                                {train,val,test}_dataloader.num_workers, .persistent_workers
data.image_scale                                {train,val,test}_dataloader.dataset.pipeline.<Resize>.scale
schedule.epochs                                 train_cfg.max_epochs
(lbc)                                           train_cfg.type (ResumableEpochLoop: a resume continues inside an epoch)
(lbc)                                           train_dataloader.batch_sampler (ResumableBatchSampler around mmdet's), .drop_last
trainer.val_interval                            train_cfg.val_interval
schedule.*, optim.lr                            param_scheduler (LinearLR warm-up, MultiStepLR)
optim.*                                         optim_wrapper.optimizer (SGD or AdamW)
trainer.amp                                     optim_wrapper.type (OptimWrapper or AmpOptimWrapper)
(lbc)                                           optim_wrapper.constructor = SparsityOptimWrapperConstructor
trainer.auto_scale_lr                           auto_scale_lr (enable, base_batch_size)
model.depth                                     model.backbone.depth, model.neck.in_channels
model.backbone_init                             model.backbone.init_cfg (None: nothing is downloaded)
model.backbone_init=random                      model.backbone.frozen_stages (-1), model.backbone.norm_eval (false)
sparsity.*, model.sparsify_parts                model = SparseDetector(detector=<mmdet's model>, sparsity, parts, init_backbone)
trainer.log_interval                            default_hooks.logger.interval, custom_hooks += SparsityHook
(lbc)                                           custom_imports += lbc.detection.plugin
trainer.checkpoint_interval                     default_hooks.checkpoint.interval (save_last)
trainer.max_keep_checkpoints                    default_hooks.checkpoint.max_keep_ckpts
(lbc)                                           visualizer.vis_backends = LocalVisBackend, TensorboardVisBackend
(lbc)                                           visualizer.name (removed: mmengine names it after the run)
trainer.device                                  env_cfg.dist_cfg.backend (nccl on cuda, gloo on cpu)
seed, trainer.deterministic                     randomness (seed, deterministic)
(torchrun)                                      launcher (pytorch under torchrun, else none)
(torchrun on cpu)                               model_wrapper_cfg (DDP without device_ids: mmengine's default is GPU-only)
(run_dir holds a checkpoint)                    resume (True: mmengine continues from run_dir/last_checkpoint), load_from (None)
model.cfg_options                               any other key, e.g. model.rpn_head.feat_channels
==============================================  ========================================================================

``model.*`` keys are mmdet's detector keys (``model.backbone.depth``); lbc then wraps the detector as
``model.detector`` of ``SparseDetector``. ``model.cfg_options`` (mmengine dotted keys, or nested
dicts, with list indices as in ``train_dataloader.dataset.pipeline.2.prob``) sets anything else in
mmdet's file; a key Hydra owns is refused there in one line naming the Hydra key to use, so no
value is set in two places.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lbc.config.resume import flatten_keys
from lbc.errors import ConfigError

__all__ = ["OWNED", "checkpoint_in", "class_names", "flat_cfg_options", "mmdet_configs_dir", "resolve_mmdet_config", "to_mmengine"]

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
SPLIT = {"train_dataloader": "train", "val_dataloader": "val", "test_dataloader": "val"}  # COCO: val2017 tests
EVALUATORS = ("val_evaluator", "test_evaluator")
RESNET_IN_CHANNELS = {18: [64, 128, 256, 512], 34: [64, 128, 256, 512]}  # 50, 101, 152: [256, 512, 1024, 2048]
PLUGIN = "lbc.detection.plugin"
DELETE = object()  # owned_values: remove this key

# (Hydra key, the mmengine keys it sets: glob patterns over dotted keys). One row per line of the
# module docstring's table; to_mmengine sets exactly the keys these patterns match, and a
# model.cfg_options key that matches one (or a parent of one) is refused.
OWNED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("run_dir", ("work_dir",)),
    ("data.root", ("*_dataloader.dataset.data_root",)),
    ("data.root (COCO layout)", ("*_dataloader.dataset.ann_file", "*_dataloader.dataset.data_prefix.img")),
    ("data.root (COCO layout)", ("*_evaluator.ann_file",)),
    ("data.classes", ("*_dataloader.dataset.metainfo.classes",)),
    ("data.classes (their number)", ("model.**.num_classes",)),
    ("data.batch_size", ("train_dataloader.batch_size",)),
    ("data.val_batch_size", ("val_dataloader.batch_size", "test_dataloader.batch_size")),
    ("data.num_workers", ("*_dataloader.num_workers", "*_dataloader.persistent_workers")),
    ("data.image_scale", ("*_dataloader.dataset.pipeline.*.scale",)),
    ("schedule.epochs", ("train_cfg.max_epochs",)),
    ("(lbc)", ("train_cfg.type",)),
    ("(lbc)", ("train_dataloader.batch_sampler", "train_dataloader.drop_last")),
    ("trainer.val_interval", ("train_cfg.val_interval",)),
    ("schedule.*, optim.lr", ("param_scheduler",)),
    ("optim.*", ("optim_wrapper.optimizer",)),
    ("trainer.amp", ("optim_wrapper.type",)),
    ("(lbc)", ("optim_wrapper.constructor",)),
    ("trainer.auto_scale_lr", ("auto_scale_lr",)),
    ("model.depth", ("model.backbone.depth", "model.neck.in_channels")),
    ("model.backbone_init", ("model.backbone.init_cfg",)),
    ("model.backbone_init=random", ("model.backbone.frozen_stages", "model.backbone.norm_eval")),
    ("sparsity.*, model.sparsify_parts", ("model.type", "model.detector", "model.sparsity", "model.parts",
                                          "model.init_backbone")),
    ("trainer.log_interval", ("default_hooks.logger.interval", "custom_hooks")),
    ("(lbc)", ("custom_imports",)),
    ("trainer.checkpoint_interval", ("default_hooks.checkpoint.interval", "default_hooks.checkpoint.save_last")),
    ("trainer.max_keep_checkpoints", ("default_hooks.checkpoint.max_keep_ckpts",)),
    ("(lbc)", ("visualizer.vis_backends",)),
    ("(lbc)", ("visualizer.name",)),
    ("trainer.device", ("env_cfg.dist_cfg.backend",)),
    ("seed, trainer.deterministic", ("randomness",)),
    ("(torchrun)", ("launcher",)),
    ("(torchrun on cpu)", ("model_wrapper_cfg",)),
    ("(run_dir holds a checkpoint)", ("resume", "load_from")),
)


# --- paths -------------------------------------------------------------------------------------


def mmdet_configs_dir() -> Path:
    """mmdet's shipped configs (``mmdet/.mim/configs`` of the installed package)."""
    import importlib.util

    spec = importlib.util.find_spec("mmdet")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("task=detection needs MMDetection: install the detection extra (pip install -e '.[det]', "
                          "or scripts/setup_env.sh --det)")
    return Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs"


def resolve_mmdet_config(name: str) -> Path:
    """``model.mmdet_config`` as a file: an absolute path as it is, else relative to mmdet's configs dir."""
    path = Path(os.path.expanduser(name))
    if not path.is_absolute():
        path = mmdet_configs_dir() / path
    if not path.is_file():
        where = "" if Path(os.path.expanduser(name)).is_absolute() else f" (looked in mmdet's configs: {mmdet_configs_dir()})"
        raise ConfigError(f"model.mmdet_config={name}: no such file{where}")
    return path


def checkpoint_in(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint mmengine resumes from in ``run_dir`` (named by its ``last_checkpoint`` file), or None."""
    marker = Path(run_dir) / "last_checkpoint"
    if not marker.is_file():
        return None
    name = marker.read_text(encoding="utf-8").strip()
    path = Path(name) if Path(name).is_absolute() else Path(run_dir) / name
    return path if path.is_file() else None


def data_root(typed_data: Any) -> Path:
    """``data.root`` as an absolute path (``~`` expanded)."""
    return Path(os.path.expanduser(str(typed_data.root))).absolute()


# --- model.cfg_options -----------------------------------------------------------------------


def flat_cfg_options(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (as YAML and ``model.cfg_options.a.b=1`` make them) to mmengine dotted keys.

    Dotted keys stay as they are; a leaf is anything but a non-empty mapping (lists are leaves).
    """
    return flatten_keys(options, prefix)


def _owner(key: str) -> str | None:
    """The Hydra key that owns mmengine ``key`` (or a key under / above it), else None."""
    for hydra_key, patterns in OWNED:
        for pattern in patterns:
            parts = pattern.split(".")
            fixed = parts.index("**") if "**" in parts else len(parts)
            above = (".".join(parts[:i]) for i in range(1, fixed))  # replacing a parent replaces the key
            if _matches(key, pattern) or _matches(key, pattern + ".**") or any(_matches(key, p) for p in above):
                return hydra_key
    return None


def _matches(key: str, pattern: str) -> bool:
    """``key`` matches ``pattern``: ``*`` is any text within one dotted part, ``**`` any number of parts."""
    regex = re.escape(pattern).replace(r"\*\*", ".+").replace(r"\*", "[^.]*")
    return re.fullmatch(regex, key) is not None


def _check_cfg_options(flat: Mapping[str, Any]) -> None:
    for key in flat:
        owner = _owner(key)
        if owner is not None:
            use = owner if not owner.startswith("(") else "nothing: lbc sets it"
            raise ConfigError(f"model.cfg_options: {key} is set by lbc from {owner}; use {use}"
                              if not owner.startswith("(") else
                              f"model.cfg_options: {key} is set by lbc {owner} and cannot be changed here")


def runner_keys() -> frozenset[str]:
    """The top-level config keys mmengine's Runner reads besides the base file's: the keywords of
    ``Runner.__init__`` (which ``Runner.from_cfg`` fills from the config), plus those it reads with
    ``self.cfg.get`` (mmengine 0.10: ``model_wrapper_cfg``, ``sync_bn``, ``find_unused_parameters``,
    ``activation_checkpointing``, ``compile``)."""
    import inspect

    from mmengine.runner import Runner

    direct = {"model_wrapper_cfg", "sync_bn", "find_unused_parameters", "activation_checkpointing", "compile"}
    return frozenset(inspect.signature(Runner.__init__).parameters) - {"self", "cfg"} | direct


def _check_top_level(flat: Mapping[str, Any], mm: Any, mmdet_config: str) -> None:
    """Refuse a ``model.cfg_options`` key whose first part neither mmdet's file nor mmengine's Runner knows:
    mmengine would keep it and never read it (a typo such as ``trian_cfg.val_interval`` is silently ignored)."""
    import difflib

    known = set(mm.keys()) | runner_keys()
    for key in flat:
        top = key.split(".")[0]
        if top not in known:
            close = difflib.get_close_matches(top, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"its top-level keys: {', '.join(sorted(mm.keys()))}"
            raise ConfigError(f"model.cfg_options: {key}: {top} is not a top-level key of {mmdet_config} nor one "
                              f"mmengine's Runner reads, so it would be ignored; {hint}")


# --- helpers over the mmengine config -----------------------------------------------------------


def _dataset_path(mm: Any, loader: str) -> str:
    """The dotted path of a loader's real data set (inside RepeatDataset & co. when wrapped)."""
    path, node = f"{loader}.dataset", mm[loader]["dataset"]
    while "dataset" in node and "ann_file" not in node:
        path, node = f"{path}.dataset", node["dataset"]
    return path


def _get(mm: Any, dotted: str) -> Any:
    node = mm
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _num_classes_keys(node: Any, prefix: str) -> Iterator[str]:
    """Dotted keys of every ``num_classes`` under ``node`` (heads, also inside lists: Cascade R-CNN)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "num_classes":
                yield f"{prefix}{key}"
            else:
                yield from _num_classes_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _num_classes_keys(value, f"{prefix}{i}.")


def class_names(typed_data: Any) -> list[str]:
    """The classes the run trains: ``data.classes``, or mmdet's 80 COCO class names when it is null."""
    if typed_data.classes is not None:
        return list(typed_data.classes)
    from mmdet.datasets import CocoDataset

    return list(CocoDataset.METAINFO["classes"])


def _optimizer(optim: Any) -> dict[str, Any]:
    """The optim group as mmengine's optimizer dict (torch.optim names and keywords)."""
    values = dataclasses.asdict(optim) if dataclasses.is_dataclass(optim) else OmegaConf.to_container(optim)
    name = values.pop("name")
    types = {"sgd": "SGD", "adamw": "AdamW"}
    if name not in types:
        raise ConfigError(f"optim={name} is not supported with task=detection; choose from: sgd, adamw")
    if name == "adamw":
        values["betas"] = tuple(values["betas"])
    return {"type": types[name], **values}


def _param_scheduler(schedule: Any) -> list[dict[str, Any]]:
    if not hasattr(schedule, "milestones"):
        raise ConfigError(f"schedule={getattr(schedule, 'name', schedule)} is not supported with task=detection; "
                          "use schedule=step_1x")
    steps: list[dict[str, Any]] = []
    if schedule.warmup_iters > 0:
        steps.append(dict(type="LinearLR", start_factor=float(schedule.warmup_ratio), by_epoch=False, begin=0,
                          end=int(schedule.warmup_iters)))
    steps.append(dict(type="MultiStepLR", begin=0, end=int(schedule.epochs), by_epoch=True,
                      milestones=[int(m) for m in schedule.milestones], gamma=float(schedule.gamma)))
    return steps


def _launcher() -> str:
    return "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else "none"


def _device_type(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- the conversion -------------------------------------------------------------------------------


def owned_values(cfg: DictConfig, typed: Mapping[str, Any], mm: Any) -> dict[str, Any]:
    """{mmengine dotted key: value} for every key Hydra owns, given mmdet's loaded config ``mm``
    (after ``model.cfg_options``); ``model.*`` keys are still mmdet's detector keys here."""
    data, model, trainer, schedule = typed["data"], typed["model"], typed["trainer"], typed["schedule"]
    root = data_root(data)
    classes = class_names(data)
    scale = tuple(int(v) for v in data.image_scale)
    values: dict[str, Any] = {"work_dir": str(Path(str(cfg.run_dir)).absolute())}

    for loader in LOADERS:
        if loader not in mm:
            continue
        split = SPLIT[loader]
        ds = _dataset_path(mm, loader)
        values[f"{ds}.data_root"] = str(root)
        values[f"{ds}.ann_file"] = f"annotations/instances_{split}2017.json"
        values[f"{ds}.data_prefix.img"] = f"{split}2017/"
        values[f"{ds}.metainfo.classes"] = tuple(classes)
        values[f"{loader}.batch_size"] = int(data.batch_size if loader == "train_dataloader" else data.val_batch_size)
        values[f"{loader}.num_workers"] = int(data.num_workers)
        values[f"{loader}.persistent_workers"] = data.num_workers > 0
        resized = [i for i, step in enumerate(_get(mm, ds)["pipeline"]) if step.get("type") == "Resize"]
        if not resized:
            raise ConfigError(f"data.image_scale: the {split} pipeline of model.mmdet_config={model.mmdet_config} "
                              "has no Resize step to set")
        for i in resized:
            values[f"{ds}.pipeline.{i}.scale"] = scale
    for evaluator in EVALUATORS:
        if evaluator in mm:
            values[f"{evaluator}.ann_file"] = str(root / "annotations" / "instances_val2017.json")

    for key in _num_classes_keys(mm["model"], "model."):
        values[key] = len(classes)

    values["train_cfg.max_epochs"] = int(schedule.epochs)
    loop = mm.get("train_cfg", {}).get("type")
    if loop not in ("EpochBasedTrainLoop", "ResumableEpochLoop"):
        raise ConfigError(f"model.mmdet_config={model.mmdet_config} trains with train_cfg.type={loop}; lbc's detection "
                          "runs are epoch-based (EpochBasedTrainLoop)")
    values["train_cfg.type"] = "ResumableEpochLoop"  # lbc.detection.loop: a resume continues inside an epoch
    if "train_dataloader" in mm:
        values["train_dataloader.batch_sampler"] = _resumable_batch_sampler(mm["train_dataloader"])
        values["train_dataloader.drop_last"] = DELETE  # the wrapped batch sampler's (a DataLoader takes one or the other)
    values["train_cfg.val_interval"] = int(trainer.val_interval)
    values["param_scheduler"] = _param_scheduler(schedule)
    values["optim_wrapper.optimizer"] = _optimizer(typed["optim"])
    values["optim_wrapper.type"] = "AmpOptimWrapper" if trainer.amp else "OptimWrapper"
    values["optim_wrapper.constructor"] = "SparsityOptimWrapperConstructor"
    base = trainer.auto_scale_lr
    values["auto_scale_lr"] = dict(enable=base is not None, base_batch_size=int(base or 16))

    backbone = mm["model"]["backbone"]
    if backbone.get("type") not in ("ResNet", "ResNetV1d"):
        raise ConfigError(f"model.depth: model.mmdet_config={model.mmdet_config} has a {backbone.get('type')} "
                          "backbone; lbc's detection models are ResNets")
    values["model.backbone.depth"] = int(model.depth)
    if "neck" in mm["model"] and "in_channels" in mm["model"]["neck"]:
        values["model.neck.in_channels"] = RESNET_IN_CHANNELS.get(model.depth, [256, 512, 1024, 2048])
    values["model.backbone.init_cfg"] = None  # random, or SparseDetector loads init_backbone: never a download
    if model.backbone_init == "random":  # nothing pretrained to keep: train every stage, BN statistics too
        values["model.backbone.frozen_stages"] = -1
        values["model.backbone.norm_eval"] = False

    values["default_hooks.logger.interval"] = int(trainer.log_interval)
    hooks = [h for h in mm.get("custom_hooks", []) if h.get("type") != "SparsityHook"]
    values["custom_hooks"] = [*hooks, dict(type="SparsityHook", log_interval=int(trainer.log_interval))]
    imports = dict(mm.get("custom_imports", {}) or {})
    names = [n for n in imports.get("imports", []) if n != PLUGIN]
    values["custom_imports"] = dict(imports=[*names, PLUGIN], allow_failed_imports=False)
    values["default_hooks.checkpoint.interval"] = int(trainer.checkpoint_interval)
    values["default_hooks.checkpoint.save_last"] = True
    values["default_hooks.checkpoint.max_keep_ckpts"] = int(trainer.max_keep_checkpoints or -1)
    values["visualizer.vis_backends"] = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
    values["visualizer.name"] = DELETE  # mmengine's visualizer is one per name in a process: a fresh one per run
    values["env_cfg.dist_cfg.backend"] = "nccl" if _device_type(trainer.device) == "cuda" else "gloo"
    values["randomness"] = dict(seed=int(cfg.seed), deterministic=bool(trainer.deterministic))
    values["launcher"] = _launcher()
    if values["launcher"] == "pytorch" and values["env_cfg.dist_cfg.backend"] == "gloo":
        values["model_wrapper_cfg"] = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                           find_unused_parameters=bool(mm.get("find_unused_parameters", False)))
    values["resume"] = checkpoint_in(values["work_dir"]) is not None
    values["load_from"] = None
    return values


def _resumable_batch_sampler(loader: Mapping[str, Any]) -> dict[str, Any]:
    """``train_dataloader.batch_sampler`` as lbc's ResumableBatchSampler around mmdet's (None: torch's, with the
    loader's ``drop_last``), so that a resume can skip the batches an epoch trained before its checkpoint."""
    inner = loader.get("batch_sampler")
    if isinstance(inner, Mapping) and inner.get("type") == "ResumableBatchSampler":
        return dict(inner)
    wrapped: dict[str, Any] = dict(type="ResumableBatchSampler", batch_sampler=dict(inner) if inner else None)
    if not inner:
        wrapped["drop_last"] = bool(loader.get("drop_last", False))
    return wrapped


def _set(mm: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = mm
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
    if isinstance(node, list):
        node[int(parts[-1])] = value
    elif value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


def sparsity_options(typed: Mapping[str, Any]) -> dict[str, Any]:
    """The sparsity group as ``lbc.sparsify`` keywords (``method`` included), plain values."""
    sp = typed["sparsity"]
    return dataclasses.asdict(sp) if dataclasses.is_dataclass(sp) else OmegaConf.to_container(sp, resolve=True)


def to_mmengine(cfg: DictConfig, typed: Mapping[str, Any]) -> Any:
    """mmdet's shipped config (``model.mmdet_config``) with ``model.cfg_options`` and the keys Hydra owns set.

    ``cfg`` is the composed Hydra config, ``typed`` what ``lbc.config.validate(cfg)`` returned. Reads
    nothing but mmdet's config file (and, with ``data.classes: null``, mmdet's COCO class names).
    """
    from mmengine.config import Config, ConfigDict

    model = typed["model"]
    flat = flat_cfg_options(model.cfg_options or {})
    _check_cfg_options(flat)
    mm = Config.fromfile(str(resolve_mmdet_config(model.mmdet_config)))
    _check_top_level(flat, mm, model.mmdet_config)
    if flat:
        try:
            mm.merge_from_dict(flat, allow_list_keys=True)
        except (KeyError, IndexError, TypeError, AssertionError) as err:
            raise ConfigError(f"model.cfg_options: {' '.join(str(err).split())}") from None
    for key, value in owned_values(cfg, typed, mm).items():
        _set(mm, key, ConfigDict(value) if isinstance(value, dict) else value)
    init = None if model.backbone_init == "random" else str(Path(os.path.expanduser(model.backbone_init)).absolute())
    mm["model"] = ConfigDict(type="SparseDetector", detector=mm["model"], sparsity=sparsity_options(typed),
                             parts=list(model.sparsify_parts), init_backbone=init)
    # named after the model option: mmengine dumps it as <run_dir>/<model.name>.py and names the run after it
    return Config(mm.to_dict(), cfg_text=mm.text, filename=f"{model.name}.py")

"""``lbc-export`` and ``lbc-check`` for detection runs (``task=detection``): a plain MMDetection checkpoint.

:func:`export_detection` (``lbc-export RUN --out OUT`` on a detection run directory or one of its
``epoch_<n>.pth``) writes

- ``model.pth``: ``{"meta": {"cfg": <config.py's text>, "dataset_meta": {"classes": ...}, "lbc": {...}},
  "state_dict": ...}``, the state dict of the plain mmdet detector (``backbone.*``, ``neck.*``, ... as mmdet
  names them: no ``detector.`` prefix, no masks or scores), the N:M masks folded into the weights (``B * W``);
  tensors and plain containers only, so ``torch.load(weights_only=True)`` (mmengine's default) reads it;
- ``config.py``: the run's mmengine config with lbc taken out: ``model`` is the detector itself (not
  ``SparseDetector``), no ``custom_imports`` of lbc, no ``SparsityHook``, no lbc optimizer constructor,
  mmengine's own train loop and mmdet's batch sampler (not lbc's resumable ones), no ``load_from`` / ``resume``;
- ``report.json`` (per layer: pattern, density, N:M or not, as a classification export's) and
  ``lbc_export.json`` (what ``lbc-check`` needs: task, pattern, exclusions, the sparse layers, the files).

So ``mmdet.apis.init_detector(OUT/config.py, OUT/model.pth)`` (or mmengine's ``Runner`` with
``load_from``) loads the detector with no lbc code installed. The promise, checked before anything in OUT
is written: the plain detector built from ``config.py``'s text with the folded weights gives the masked
model's features and predictions on a fixed image (else a RuntimeError: a bug).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.export.check import LayerCheck, check_layer, require_same_keys
from lbc.export.fold import Say, layers_report, load_state, silent
from lbc.export.write import _out_dir, report_json
from lbc.io import atomic_write, read_pt
from lbc.sparsity.nm import NMPattern, eligibility

DET_FILES = ("model.pth", "config.py", "report.json", "lbc_export.json")
FACTS = "lbc_export.json"
LBC_TYPES = ("SparsityHook", "SparsityOptimWrapperConstructor")  # what a plain mmdet cannot build
PLUGIN = "lbc.detection.plugin"
VERIFY_SIZE = 128  # the side of the fixed random image the outputs are compared on (default)


def _mmdet() -> Any:
    """mmdet's model registry with its modules registered (one line if the detection extra is missing)."""
    try:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
    except ImportError as err:
        raise ConfigError(f"a detection export needs mmdet ({first_line(err)}): pip install -e '.[det]'") from None
    register_all_modules(init_default_scope=True)
    return MODELS


# --- which checkpoint ----------------------------------------------------------------------------


def detection_checkpoint(source: str | Path) -> Path | None:
    """The mmengine checkpoint of ``source`` if it is a detection run: a run directory (no ``last.pt``; its
    ``last_checkpoint`` names the checkpoint (``epoch_<n>.pth``, or ``iter_<n>.pth`` inside an epoch), else its
    newest ``epoch_<n>.pth``) or a ``.pth`` file. None
    for anything else (a classification or lm run: :func:`lbc.export.fold.load_training_checkpoint`)."""
    path = Path(source)
    if path.is_file():
        return path if path.suffix == ".pth" else None
    if not path.is_dir() or (path / "last.pt").exists():
        return None
    epochs = sorted(path.glob("epoch_*.pth"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not (path / "last_checkpoint").is_file() and not epochs:
        return None
    from lbc.detection.config import checkpoint_in

    found = checkpoint_in(path) or (epochs[-1] if epochs else None)
    if found is None:
        raise ConfigError(f"{str(path)!r} is a detection run whose last_checkpoint names no file and which has no "
                          "epoch_<n>.pth: pass the checkpoint file")
    return found


def read_detection_checkpoint(path: Path) -> dict[str, Any]:
    """An lbc detection run's mmengine checkpoint, weights only (the mmengine globals lbc allows by name)."""
    _mmdet()
    from lbc.detection.checkpoint import safe_globals_list

    ckpt = read_pt(path, "checkpoint", safe_globals=safe_globals_list())
    what = f"{str(path)!r} is not a checkpoint of an lbc detection run"
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise ConfigError(f"{what} (no state_dict); pass a run directory or its epoch_<n>.pth")
    if not isinstance(ckpt.get("meta"), dict) or not isinstance(ckpt["meta"].get("cfg"), str):
        raise ConfigError(f"{what} (no meta.cfg: mmengine's Runner writes the config there)")
    if not isinstance(ckpt.get("lbc_sparsity"), dict):
        raise ConfigError(f"{what} (no lbc_sparsity: it was not trained with SparsityHook)")
    return ckpt


# --- configs ---------------------------------------------------------------------------------------


def _config(text: str, where: str) -> Any:
    from mmengine.config import Config

    try:
        return Config.fromstring(text, ".py")
    except Exception as err:  # noqa: BLE001  (mmengine's parser: SyntaxError, ImportError, KeyError ...)
        raise ConfigError(f"{where}: the config does not parse: {first_line(err)}") from None


def plain_config(run_cfg: Any) -> Any:
    """The run's mmengine config with lbc taken out (see the module's docstring): a plain mmdet config."""
    from mmengine.config import Config

    cfg = Config(run_cfg.to_dict())
    model = cfg.model
    if model.get("type") != "SparseDetector" or not isinstance(model.get("detector"), Mapping):
        raise ConfigError(f"the run's model is {model.get('type')!r}, not SparseDetector: not an lbc detection run")
    detector = dict(model["detector"])
    if model.get("data_preprocessor") is not None:
        detector["data_preprocessor"] = model["data_preprocessor"]
    cfg.model = detector
    imports = cfg.get("custom_imports")
    if isinstance(imports, Mapping):
        kept = [m for m in imports.get("imports", []) if not str(m).startswith("lbc")]
        if kept:
            cfg.custom_imports = {**imports, "imports": kept}
        else:
            cfg.pop("custom_imports")
    if cfg.get("custom_hooks"):
        cfg.custom_hooks = [h for h in cfg.custom_hooks if h.get("type") not in LBC_TYPES]
    wrapper = cfg.get("optim_wrapper")
    if isinstance(wrapper, Mapping) and wrapper.get("constructor") in LBC_TYPES:
        wrapper.pop("constructor")
    train_cfg = cfg.get("train_cfg")
    if isinstance(train_cfg, Mapping) and train_cfg.get("type") == "ResumableEpochLoop":
        train_cfg["type"] = "EpochBasedTrainLoop"  # lbc.detection.loop's subclass: the same loop without resuming
    loader = cfg.get("train_dataloader")
    sampler = loader.get("batch_sampler") if isinstance(loader, Mapping) else None
    if isinstance(sampler, Mapping) and sampler.get("type") == "ResumableBatchSampler":  # the batch sampler it wraps
        if sampler.get("batch_sampler"):
            loader["batch_sampler"] = sampler["batch_sampler"]
        else:
            loader.pop("batch_sampler")
            loader["drop_last"] = bool(sampler.get("drop_last", False))
    cfg.load_from, cfg.resume = None, False
    return cfg


def _classes(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``dataset_meta`` as plain containers (init_detector reads its ``classes``)."""
    dataset_meta = meta.get("dataset_meta") or {}
    try:
        return json.loads(json.dumps(dict(dataset_meta), default=list))
    except (TypeError, ValueError):
        return {"classes": list(dataset_meta.get("classes") or [])}


# --- folding -------------------------------------------------------------------------------------


@dataclass
class DetectionFolded:
    """A detection run's plain mmdet detector, masks folded in, and what the export directory holds."""

    model: nn.Module  # the plain detector (no lbc code), eval mode, CPU
    state: dict[str, torch.Tensor]
    config_text: str  # config.py
    pattern: NMPattern
    layers: list[LayerCheck]
    facts: dict[str, Any]  # lbc_export.json
    checkpoint_meta: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)  # source, method, epoch, model, max_abs_diff

    def report(self) -> dict[str, Any]:
        """report.json: the run it came from, totals and one entry per Conv2d/Linear layer."""
        return layers_report(self.pattern, self.layers, {"task": "detection", **self.meta})


def verification_batch(model: nn.Module, size: int = VERIFY_SIZE) -> dict[str, Any]:
    """A fixed random uint8 image through the detector's data preprocessor: ``{"inputs", "data_samples"}``."""
    from mmdet.structures import DetDataSample

    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    sample = DetDataSample(metainfo={"img_shape": (size, size), "ori_shape": (size, size), "scale_factor": (1.0, 1.0),
                                     "img_id": 0})
    with torch.no_grad():
        return model.data_preprocessor({"inputs": [image], "data_samples": [sample]}, False)


def detector_outputs(detector: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The neck's features and the predictions (boxes, scores, labels, masks) of ``detector`` on ``batch``."""
    with torch.no_grad():
        feats = detector.extract_feat(batch["inputs"])
        samples = detector.predict(batch["inputs"], batch["data_samples"])
    out = {f"feature{i}": f for i, f in enumerate(feats)}
    pred = samples[0].pred_instances
    for key in ("bboxes", "scores", "labels", "masks"):
        if key in pred:
            out[key] = pred[key].float()
    return out


def _difference(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> float:
    """The largest difference of the plain detector's outputs from the masked one's; else RuntimeError (a bug)."""
    worst = 0.0
    for key, want in expected.items():
        have = got.get(key)
        if have is None or have.shape != want.shape:
            raise RuntimeError(f"export: the plain detector's {key} differ from the masked detector's "
                               f"({None if have is None else list(have.shape)} vs {list(want.shape)})")
        if want.numel():
            worst = max(worst, float((have - want).abs().max()))
        if not torch.allclose(have, want, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"export: the plain detector's {key} differ from the masked detector's "
                               f"(max |diff| {worst:g})")
    return worst


def fold_detection(ckpt: Mapping[str, Any], *, source: str = "", say: Say = silent,
                   size: int = VERIFY_SIZE) -> DetectionFolded:
    """The plain mmdet detector of an lbc detection checkpoint, masks folded in, checked against the masked one.

    Builds the run's ``SparseDetector`` from the checkpoint's config (``meta.cfg``), loads its state dict and
    the method's state, takes the masked model's outputs on a fixed image, detaches the method (``B * W``
    becomes the weight), builds the plain detector from the text of the export's ``config.py`` and loads
    the folded state dict into it (strict), and compares.
    """
    models = _mmdet()
    import lbc.detection.plugin  # noqa: F401  (SparseDetector: the run's model)

    run_cfg = _config(ckpt["meta"]["cfg"], f"{source}: meta.cfg")
    plain_cfg = plain_config(run_cfg)
    text = plain_cfg.pretty_text
    sparse_cfg = dict(run_cfg.model.to_dict() if hasattr(run_cfg.model, "to_dict") else run_cfg.model)
    sparse_cfg["init_backbone"] = None  # the checkpoint holds the weights: nothing to read at init
    sparsity_cfg = dict(sparse_cfg.get("sparsity") or {})
    say(f"building {sparse_cfg['detector'].get('type')} with {sparsity_cfg.get('method')} "
        f"{sparsity_cfg.get('pattern')} attached")
    try:
        sparse = models.build(sparse_cfg)
    except (TypeError, KeyError, ValueError) as err:
        raise ConfigError(f"{source}: its detector cannot be built: {first_line(err)}") from None
    load_state(sparse, ckpt["state_dict"], source or "the checkpoint")
    sp = sparse.sparsity
    sp.load_state_dict(ckpt["lbc_sparsity"])
    sparse.eval()
    batch = verification_batch(sparse, size)
    expected = detector_outputs(sparse.detector, batch)
    selected, reasons, pattern = set(sp.layers), dict(sp.dense_reasons), sp.pattern
    exclude = list(sp.exclude) + [n for n, r in reasons.items() if not r.startswith("excluded")
                                  and eligibility(sparse.detector.get_submodule(n), pattern) is None]
    sp.detach()
    folded = {k: v.detach().clone().contiguous() for k, v in sparse.detector.state_dict().items()}

    plain = models.build(_config(text, "config.py").model)
    load_state(plain, folded, "the folded weights")
    plain.eval()
    say("comparing the plain detector's features and predictions with the masked one's")
    diff = _difference(detector_outputs(plain, batch), expected)
    layers = [check_layer(name, module.weight, pattern, name in selected, reasons.get(name, ""))
              for name, module in plain.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    detector_type = str(plain_cfg.model.get("type"))
    depth = (plain_cfg.model.get("backbone") or {}).get("depth")
    name = f"{detector_type} (ResNet-{depth})" if depth else detector_type
    method = sp.name
    meta = {"source": source, "method": method, "epoch": ckpt["meta"].get("epoch"), "model": name,
            "max_abs_diff": diff}
    facts = {"task": "detection", "model": name, "method": method, "pattern": str(pattern), "exclude": exclude,
             "layers": sorted(selected)}
    lbc_meta = {"source": source, "method": method, "pattern": str(pattern), "epoch": ckpt["meta"].get("epoch")}
    checkpoint_meta = {"cfg": text, "dataset_meta": _classes(ckpt["meta"]), "lbc": lbc_meta,
                       "epoch": ckpt["meta"].get("epoch"), "iter": ckpt["meta"].get("iter")}
    return DetectionFolded(plain, folded, text, pattern, layers, facts, checkpoint_meta, meta)


def write_detection(folded: DetectionFolded, out: str | Path, *, say: Say = silent) -> dict[str, Any]:
    """Write ``model.pth``, ``config.py``, ``lbc_export.json`` and ``report.json`` into ``out`` (each
    atomically); a classification export's files there are removed (they would not match). The report."""
    out = _out_dir(out)
    report = {**folded.report(), "files": list(DET_FILES)}
    say(f"writing {out / 'model.pth'} (mmdet checkpoint) and {out / 'config.py'}")
    checkpoint = {"meta": folded.checkpoint_meta, "state_dict": folded.state}
    atomic_write(out / "model.pth", lambda p: torch.save(checkpoint, p))
    atomic_write(out / "config.py", lambda p: p.write_text(folded.config_text))
    facts = {**folded.facts, "files": list(DET_FILES)}
    atomic_write(out / FACTS, lambda p: p.write_text(json.dumps(facts, indent=1) + "\n"))
    for stale in ("model.safetensors", "config.yaml", "model.onnx", "model.onnx.data"):
        (out / stale).unlink(missing_ok=True)
    atomic_write(out / "report.json", lambda p: p.write_text(report_json(report)))
    return report


def check_detection_options(*, ema: bool = False, onnx: bool = False, input_size: list[int] | None = None) -> None:
    """Refuse, in one line, the ``lbc-export`` options a detection export does not support."""
    for flag, given in (("--ema", ema), ("--onnx", onnx), ("--input-size", input_size is not None)):
        if given:
            raise ConfigError(f"{flag} is not supported for task=detection (the export is an mmdet checkpoint, "
                              "checked on a fixed image); export without it")


def export_detection(path: Path, out: str | Path, *, say: Say = silent) -> tuple[DetectionFolded, dict[str, Any]]:
    """``lbc-export`` of a detection checkpoint: read, fold, write; (folded, report)."""
    folded = fold_detection(read_detection_checkpoint(path), source=str(path), say=say)
    return folded, write_detection(folded, out, say=say)


# --- lbc-check -------------------------------------------------------------------------------------


def detection_facts_beside(weights: str | Path) -> Path | None:
    """The ``lbc_export.json`` of a detection export beside a weight file, or None (none, or another task's)."""
    path = Path(weights).with_name(FACTS)
    if not path.is_file():
        return None
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return path if isinstance(facts, dict) and facts.get("task") == "detection" else None


def read_detection_facts(path: Path) -> dict[str, Any]:
    """A detection export's ``lbc_export.json`` (one-line ConfigError if it lacks what lbc-check needs)."""
    facts = json.loads(path.read_text())
    ok = (isinstance(facts.get("pattern"), str) and isinstance(facts.get("exclude"), list)
          and isinstance(facts.get("layers"), list))
    if not ok:
        raise ConfigError(f"{str(path)!r} is not an lbc detection export file (pattern, exclude, layers)")
    return facts


def detection_check_inputs(
    facts_path: Path, pattern: str | None = None, exclude: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], nn.Module, str, list[str], str]:
    """What ``lbc-check`` checks a detection export with: (the state dict of ``model.pth``, the plain detector
    built from ``config.py``, pattern, exclude globs, where the layer list comes from).

    The weights must be exactly the detector's (every key, every shape); the layers that must be N:M are the
    training selection (the export's pattern and exclusions; ``pattern`` and ``exclude`` override them), and
    with the export's own pattern and exclusions that selection must be the one ``lbc_export.json`` names.
    """
    facts = read_detection_facts(facts_path)
    folder = facts_path.parent
    weights = folder / "model.pth"
    ckpt = read_pt(weights, "WEIGHTS")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"WEIGHTS={str(weights)!r} holds no state_dict (an mmdet checkpoint has one)")
    state = {k: v for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    models = _mmdet()
    config_path = folder / "config.py"
    try:
        text = config_path.read_text()
    except OSError as err:
        raise ConfigError(f"{str(config_path)!r} cannot be read: {err.strerror or err}") from None
    cfg = _config(text, str(config_path))
    try:
        model = models.build(cfg.model)
    except Exception as err:  # noqa: BLE001  (mmengine's registry: KeyError, TypeError, AssertionError ...)
        raise ConfigError(f"{str(config_path)!r}: its model cannot be built: {first_line(err)}") from None
    require_same_keys(state, model, f"the weights of {str(weights)!r}", str(config_path))
    if pattern is None and exclude is None:
        from lbc.sparsity.selection import select_layers

        chosen = sorted(select_layers(model, facts["pattern"], facts["exclude"]).layers)
        if chosen != sorted(facts["layers"]):
            raise ConfigError(f"{str(config_path)!r} and {str(facts_path)!r} disagree on the sparse layers: the files "
                              "are not of one export (export the run again)")
    source = f"{facts.get('model')} ({facts.get('method')}) from {config_path}"
    return state, model, pattern or facts["pattern"], facts["exclude"] if exclude is None else exclude, source

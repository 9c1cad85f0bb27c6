"""Fold a training checkpoint's masks into plain weights: the model an inference stack wants.

A run's ``last.pt`` holds the *stored* (unmasked) weights, the method's masks and scores, the
optimizer and the schedule. :func:`fold_checkpoint` rebuilds the model from the run's config,
attaches the same sparsity method, loads the checkpoint and bakes ``B * W`` into the weights
(``SparsityMethod.detach``: the very forward the masked model runs), then loads the result into a
fresh model with no lbc code attached and checks that both give the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.export.check import LayerCheck, check_layer
from lbc.io import read_pt, strip_module_prefix
from lbc.models import build_model
from lbc.sparsity import sparsify
from lbc.sparsity.nm import NMPattern, eligibility
from lbc.sparsity.selection import stem_and_classifier

Say = Callable[[str], None]


def silent(_: str) -> None:
    """The default ``say``: report nothing."""


# --- reading a training checkpoint --------------------------------------------------------------


def checkpoint_path(source: str | Path) -> Path:
    """The checkpoint file of ``source``: a run directory's ``last.pt``, or the file itself."""
    path = Path(source)
    if path.is_dir():
        if not (path / "last.pt").is_file():
            raise ConfigError(f"{str(path)!r} is a directory without last.pt: pass a run directory or a checkpoint file")
        return path / "last.pt"
    if not path.exists():
        raise ConfigError(f"{str(path)!r}: no such run directory or checkpoint file")
    return path


def load_training_checkpoint(source: str | Path) -> tuple[dict[str, Any], Path]:
    """Read an lbc training checkpoint (weights only); a one-line ConfigError if it is not one.

    Refuses a detection config here (detection runs are mmengine checkpoints, read by
    :mod:`lbc.export.detection`); language-model runs (``task=lm``) pass through, for :mod:`lbc.export.lm`.
    """
    path = checkpoint_path(source)
    ckpt = read_pt(path, "checkpoint")
    what = f"{str(path)!r} is not an lbc training checkpoint"
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{what} (it holds a {type(ckpt).__name__}); pass a run directory or its last.pt")
    for key in ("model", "sparsity", "config"):
        if not isinstance(ckpt.get(key), dict):
            raise ConfigError(f"{what} (no {key!r} entry); pass a run directory or its last.pt")
    config = ckpt["config"]
    if not isinstance(config.get("model"), dict) or not isinstance(config.get("sparsity"), dict):
        raise ConfigError(f"{what}: its config has no model or sparsity section")
    task = config.get("task") or {}
    if (isinstance(task, dict) and task.get("name") == "detection") or "mmdet_config" in config["model"]:
        raise ConfigError(f"{str(path)!r} is a detection run's config in a classification checkpoint: export the "
                          "detection run's directory (or its epoch_<n>.pth) instead")
    return ckpt, path


def infer_num_classes(model_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], declared: int | None = None) -> int:
    """``declared`` if given, else the output size of the model's classifier weight in ``state``.

    The classifier is found as training finds it (``stem_and_classifier``) on a copy of the model
    built on the meta device: no memory, no initialisation cost.
    """
    if declared:
        return int(declared)
    with torch.device("meta"):
        probe = build_model(num_classes=1000, **dict(model_cfg))
    for name in stem_and_classifier(probe)[1]:
        weight = state.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            return int(weight.shape[0])
    raise ConfigError(f"cannot tell the number of classes of model.name={model_cfg.get('name')!r}: "
                      "no classifier weight in the weights and no data.num_classes in the config")


def input_size_of(config: Mapping[str, Any]) -> list[int] | None:
    """The run's [C, H, W]: ``data.input_size``, else ``data.image_size`` with 3 channels; None if unknown."""
    data = config.get("data") or {}
    if data.get("input_size"):
        return [int(v) for v in data["input_size"]]
    if data.get("image_size"):
        channels = int((config.get("model") or {}).get("in_channels") or (config.get("model") or {}).get("in_chans") or 3)
        return [channels, int(data["image_size"]), int(data["image_size"])]
    return None


def load_state(model: nn.Module, state: Mapping[str, Any], where: str) -> None:
    """``model.load_state_dict(state)`` (strict) whose mismatch is one ConfigError line naming ``where``."""
    try:
        model.load_state_dict(dict(state))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0]
        raise ConfigError(f"{where} does not fit the model: {first}") from None


# --- folding ------------------------------------------------------------------------------------


@dataclass
class Folded:
    """A model with its masks folded in: plain weights, the model's config, the per-layer check."""

    model: nn.Module  # plain (no lbc code attached), eval mode, CPU
    state: dict[str, torch.Tensor]
    config: dict[str, Any]  # what config.yaml holds
    pattern: NMPattern
    layers: list[LayerCheck]
    meta: dict[str, Any] = field(default_factory=dict)  # source, method, epoch, weights, max_abs_diff

    def report(self) -> dict[str, Any]:
        """report.json: the run it came from, totals and one entry per Conv2d/Linear layer."""
        return layers_report(self.pattern, self.layers, self.meta)


def layers_report(pattern: NMPattern, layers: list[LayerCheck], meta: Mapping[str, Any]) -> dict[str, Any]:
    """report.json of any export (classification, detection): ``meta``, then the N:M verdict over the
    layers that must hold it, the overall density and one entry per Conv2d/Linear layer."""
    required = [c for c in layers if c.required]
    sizes = {c.name: math.prod(c.shape) for c in layers}
    nonzero = sum(round(c.density * sizes[c.name]) for c in layers)
    return {
        **meta,
        "pattern": str(pattern),
        "nm": bool(required) and all(c.nm for c in required),
        "exact_nm": bool(required) and all(c.exact_nm for c in required),
        "nm_layers": len(required),
        "density": nonzero / max(1, sum(sizes.values())),
        "layers": [c.row(pattern) for c in layers],
    }


def _verification_input(input_size: list[int] | None) -> torch.Tensor | None:
    if not input_size:
        return None
    return torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))


def _weights(ckpt: Mapping[str, Any], ema: bool, source: str) -> dict[str, Any]:
    """The checkpoint's model weights (its EMA weights with ``ema``), without DDP's ``module.`` prefix."""
    if not ema:
        return strip_module_prefix(ckpt["model"])
    if not isinstance(ckpt.get("ema"), dict):
        raise ConfigError(f"{source or 'the checkpoint'} kept no EMA weights (the run had trainer.ema=false): "
                          "export without --ema")
    return strip_module_prefix(ckpt["ema"])


def _outputs(model: nn.Module, x: torch.Tensor | None, name: Any) -> torch.Tensor | None:
    """``model(x)`` without gradients (None without an input); a model that cannot run ``x`` is one line."""
    if x is None:
        return None
    try:
        with torch.no_grad():
            return model(x)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ConfigError(f"{name} cannot run a {list(x.shape)} input: {first_line(err)}; "
                          "pass the model's input size with --input-size C H W") from None


def _folded_difference(plain: nn.Module, x: torch.Tensor | None, expected: torch.Tensor | None) -> float | None:
    """The largest difference of the plain model's outputs from the masked model's (None without an input);
    beyond float tolerance a RuntimeError: folding changed what the model computes, a bug."""
    if x is None or expected is None:
        return None
    with torch.no_grad():
        got = plain(x)
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"export: the folded model's outputs differ from the masked model's (max |diff| {diff:g})")
    return diff


def fold_checkpoint(ckpt: Mapping[str, Any], *, ema: bool = False, source: str = "", say: Say = silent,
                    input_size: list[int] | None = None) -> Folded:
    """The plain model of a training checkpoint (its EMA weights with ``ema``), masks folded in.

    Builds the model from the checkpoint's config, attaches its sparsity method, loads the weights
    and the method's state, runs the masked model (eval mode) on a fixed random input, detaches the
    method (``B * W`` becomes the weight), loads the folded state dict into a freshly built model
    and checks that it gives the same outputs (else RuntimeError: that would be a bug).
    """
    config = ckpt["config"]
    model_cfg, sparsity_cfg = dict(config["model"]), dict(config["sparsity"])
    state = _weights(ckpt, ema, source)
    num_classes = infer_num_classes(model_cfg, state, (config.get("data") or {}).get("num_classes"))
    input_size = input_size or input_size_of(config)
    say(f"building {model_cfg.get('name')} ({num_classes} classes) with {sparsity_cfg.get('method')} "
        f"{sparsity_cfg.get('pattern')} attached")
    model = build_model(num_classes=num_classes, **model_cfg)
    sp = sparsify(model, **sparsity_cfg)
    load_state(model, state, source or "the checkpoint")
    sp.load_state_dict(ckpt["sparsity"])
    model.eval()
    x = _verification_input(input_size)
    expected = _outputs(model, x, model_cfg.get("name"))
    selected, reasons, pattern = set(sp.layers), dict(sp.dense_reasons), sp.pattern
    exclude = list(sp.exclude) + [n for n, r in reasons.items() if not r.startswith("excluded")
                                  and eligibility(model.get_submodule(n), pattern) is None]
    sp.detach()
    folded = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    plain = build_model(num_classes=num_classes, **model_cfg)
    load_state(plain, folded, "the folded weights")
    diff = _folded_difference(plain.eval(), x, expected)
    layers = [
        check_layer(name, module.weight, pattern, name in selected, reasons.get(name, ""))
        for name, module in plain.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    out_config = {
        "model": model_cfg,
        "num_classes": num_classes,
        "input_size": input_size,
        "sparsity": {"method": sparsity_cfg.get("method"), "pattern": str(pattern), "exclude": exclude},
    }
    meta = {"source": source, "method": sparsity_cfg.get("method"), "epoch": ckpt.get("epoch"),
            "weights": "ema" if ema else "model", "model": model_cfg.get("name"), "num_classes": num_classes,
            "input_size": input_size, "max_abs_diff": diff}
    return Folded(plain, folded, out_config, pattern, layers, meta)

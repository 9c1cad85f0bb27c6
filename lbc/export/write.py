"""The export directory: ``model.safetensors`` (the model's own state-dict keys), ``config.yaml`` (what
:func:`load_exported` needs to build the model again), ``report.json`` (per layer: pattern, density,
N:M or not) and, on request, ``model.onnx``; each written atomically, and read back by
:func:`load_exported`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.export.check import read_weights
from lbc.export.fold import Folded, Say, fold_checkpoint, load_state, load_training_checkpoint, silent
from lbc.export.onnx import ONNX_FILE, ONNX_OPSET, export_onnx
from lbc.io import atomic_write
from lbc.models import build_model

FILES = ("model.safetensors", "config.yaml", "report.json")


def report_json(report: Mapping[str, Any]) -> str:
    """report.json's text: the totals indented, one line per layer."""
    head = json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1)
    layers = ",\n".join(f"  {json.dumps(row)}" for row in report.get("layers", []))
    return f'{head[:-2]},\n "layers": [\n{layers}\n ]\n}}\n'


def _out_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {str(out)!r} cannot be created: {err.strerror or err}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {str(out)!r} is not writable")
    return out


def write_export(folded: Folded, out: str | Path, *, onnx: bool = False, opset: int = ONNX_OPSET,
                 say: Say = silent) -> dict[str, Any]:
    """Write ``model.safetensors``, ``config.yaml`` and ``report.json`` (and ``model.onnx``) into ``out``.

    Each file is written atomically; a ``model.onnx`` left by an earlier export is removed when
    this one writes none (it would not match). Returns the report.
    """
    from safetensors.torch import save_file

    out = _out_dir(out)
    report = folded.report()
    metadata = {"format": "pt", "lbc_pattern": str(folded.pattern), "lbc_method": str(report.get("method")),
                "lbc_model": str(report.get("model"))}
    say(f"writing {out / 'model.safetensors'}")
    atomic_write(out / "model.safetensors", lambda p: save_file(folded.state, str(p), metadata=metadata))
    atomic_write(out / "config.yaml", lambda p: p.write_text(yaml.safe_dump(folded.config, sort_keys=False)))
    if onnx:
        if not folded.config.get("input_size"):
            raise ConfigError("--onnx needs the input size, which the run's config does not say: pass --input-size C H W")
        say(f"writing {out / ONNX_FILE} (opset {opset}) and checking it with onnxruntime")
        report["onnx"] = export_onnx(folded.model, folded.config["input_size"], out / ONNX_FILE, opset=opset)
    else:
        for stale in (out / ONNX_FILE, out / f"{ONNX_FILE}.data"):
            stale.unlink(missing_ok=True)
    (out / "lbc_export.json").unlink(missing_ok=True)  # an earlier lm export's facts: lbc-check would read them
    atomic_write(out / "report.json", lambda p: p.write_text(report_json(report)))
    return report


def export_run(source: str | Path, out: str | Path, *, ema: bool = False, onnx: bool = False,
               opset: int = ONNX_OPSET, input_size: list[int] | None = None,
               say: Say = silent) -> tuple[Folded, dict[str, Any]]:
    """``lbc-export``'s work: read the run's checkpoint, fold it, write the export into ``out``; (folded, report).

    A language-model run (``task=lm``) goes to :mod:`lbc.export.lm` (a ``save_pretrained`` directory).
    """
    ckpt, path = load_training_checkpoint(source)
    task = ckpt["config"].get("task")
    if isinstance(task, dict) and task.get("name") == "lm":
        from lbc.export.lm import check_lm_options, fold_lm, write_lm  # lm imports this module

        check_lm_options(ema=ema, onnx=onnx, input_size=input_size)
        lm = fold_lm(ckpt, source=str(path), say=say)
        return lm, write_lm(lm, out, say=say)
    folded = fold_checkpoint(ckpt, ema=ema, source=str(path), say=say, input_size=input_size)
    return folded, write_export(folded, out, onnx=onnx, opset=opset, say=say)


def load_exported(out: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of an export directory: built from its ``config.yaml``, weights from ``model.safetensors``."""
    out = Path(out)
    config = read_export_config(out / "config.yaml")
    model = build_model(num_classes=int(config["num_classes"]), **dict(config["model"]))
    load_state(model, read_weights(out / "model.safetensors"), str(out / "model.safetensors"))
    return model.to(device).eval()


def read_export_config(path: str | Path) -> dict[str, Any]:
    """An export's config.yaml (one-line ConfigError if it is not one)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable export config: {first_line(err)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not config.get("num_classes"):
        raise ConfigError(f"{str(path)!r} is not an lbc export config (no model section or num_classes)")
    return config

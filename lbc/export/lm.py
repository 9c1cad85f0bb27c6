"""``lbc-export`` and ``lbc-check`` for language-model runs (``task=lm``): a ``save_pretrained`` directory.

:func:`export_lm` (``lbc-export RUN --out OUT`` on an lm run) writes

- ``model.safetensors``, ``config.json``, ``generation_config.json``: the transformers model's own
  ``save_pretrained``, in the stock class's layout (GPT-2's ``Conv1D`` weights back to (in, out)), the
  masks folded in (``B * W``);
- the tokenizer's files (its ``save_pretrained``);
- ``report.json`` (per layer: pattern, density, N:M or not, shapes in the training layout (out, in) even
  for ``Conv1D``; ``max_abs_diff`` of the reloaded model's logits) and ``lbc_export.json`` (what ``lbc-check`` needs: pattern, exclusions, method, the ``Conv1D`` layers).

The promise, checked before anything in OUT changes: ``AutoModelForCausalLM.from_pretrained(OUT)``, with no
lbc code, gives the masked training model's logits (else a RuntimeError: a bug).

How it is written: ``save_pretrained`` writes its own files, so the model and tokenizer are saved into a
private staging directory inside OUT (``.lbc-export-*``), reloaded and checked there, then every file is
moved into OUT through :func:`lbc.io.atomic_write` (one ``os.replace`` each: never half a file). A failed
export leaves OUT's earlier files as they were; the files of an earlier export that this one does not write
(another tokenizer's, a classification export's ``config.yaml`` and ``model.onnx``) are removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.export.check import check_layer
from lbc.export.fold import Folded, Say, load_state, silent
from lbc.export.onnx import ONNX_FILE
from lbc.export.write import _out_dir, read_export_config, report_json
from lbc.io import atomic_write, storage_error, strip_module_prefix
from lbc.lm.model import (
    DTYPES,
    build_tokenizer,
    gguf_path,
    hf_state_dict,
    linearize_conv1d,
    require_transformers,
)
from lbc.sparsity import sparsify
from lbc.sparsity.nm import eligibility

LM_FACTS = "lbc_export.json"
STAGING = ".lbc-export-"
VERIFY_BATCH, VERIFY_TOKENS = 2, 16  # the fixed random token batch the logits are compared on


def is_lm_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a training checkpoint is of a language-model run (``config.task.name == "lm"``)."""
    task = (ckpt.get("config") or {}).get("task") or {}
    return isinstance(task, Mapping) and task.get("name") == "lm"


def check_lm_options(*, ema: bool = False, onnx: bool = False, input_size: list[int] | None = None) -> None:
    """Refuse, in one line, the ``lbc-export`` options that a language-model export does not support."""
    for flag, given in (("--ema", ema), ("--onnx", onnx), ("--input-size", input_size is not None)):
        if given:
            raise ConfigError(f"{flag} is not supported for task=lm (the export is a transformers save_pretrained "
                              "directory, checked on token ids); export without it")


def hf_causal_lm(hf_config: Mapping[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """The stock transformers model of ``hf_config`` (``model.config.to_dict()``), random weights, eval mode.

    A GGUF model's ``quantization_config`` is dropped (its weights were dequantised for training) and so is
    ``use_cache`` (lbc trains without the cache; the export gets the class's default).
    """
    transformers = require_transformers()
    cfg = {k: v for k, v in dict(hf_config).items() if k not in ("quantization_config", "use_cache")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise ConfigError("the checkpoint's hf_config has no model_type: it is not a transformers config")
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"the checkpoint's hf_config (model_type={model_type!r}) does not build a causal LM: "
                          f"{first_line(err)}") from None
    return model.eval()


def lm_tokenizer(model_cfg: Mapping[str, Any]) -> Any:
    """The run's tokenizer, as training built it from ``model.*`` (bytes, a directory, the GGUF's, the source's)."""
    gguf = gguf_path(model_cfg["gguf_file"], model_cfg.get("package")) if model_cfg.get("gguf_file") else None
    return build_tokenizer(model_cfg.get("tokenizer"), source=model_cfg.get("source"), gguf=gguf)


def verification_ids(model: nn.Module) -> torch.Tensor:
    """The fixed random token batch (seed 0) whose logits the export must reproduce."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    vocab = model.get_input_embeddings().num_embeddings
    length = min(VERIFY_TOKENS, positions or VERIFY_TOKENS)
    return torch.randint(0, vocab, (VERIFY_BATCH, length), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _difference(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Largest |got - expected|; beyond float tolerance a RuntimeError (the export changed the model: a bug)."""
    diff = float((got - expected).abs().max())
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"export: {what} logits differ from the masked model's (max |diff| {diff:g})")
    return diff


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off (saving and loading shards), as they were afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# --- folding ------------------------------------------------------------------------------------


@dataclass
class LMFolded(Folded):
    """A folded language model: ``model`` is the stock transformers class (not linearized), ``state`` its
    state dict (the file's layout), ``layers`` checked in the training layout (``Conv1D`` weights as (out, in))."""

    tokenizer: Any = None
    input_ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # the masked model's, on input_ids


def fold_lm(ckpt: Mapping[str, Any], *, source: str = "", say: Say = silent) -> LMFolded:
    """The stock transformers model of an lm checkpoint, masks folded in, checked against the masked model.

    Rebuilds the model from ``ckpt["hf_config"]`` as training had it (``Conv1D`` as ``nn.Linear``, the
    method attached, the weights and the method's state loaded), runs it on :func:`verification_ids`,
    folds the masks (``detach``), converts to the stock layout (:func:`lbc.lm.model.hf_state_dict`) and
    loads that into a fresh stock model, whose logits must equal the masked model's.
    """
    config = ckpt["config"]
    model_cfg, sparsity_cfg = dict(config["model"]), dict(config["sparsity"])
    hf_config = ckpt.get("hf_config")
    where = source or "the checkpoint"
    if not isinstance(hf_config, Mapping):
        raise ConfigError(f"{where} is a task=lm checkpoint without 'hf_config' (the transformers config): "
                          "it was written by an older lbc; train or resume it with this one to export it")
    dtype = DTYPES.get(str(model_cfg.get("dtype") or "float32"), torch.float32)
    say(f"building {model_cfg.get('name')} ({hf_config.get('model_type')}) with {sparsity_cfg.get('method')} "
        f"{sparsity_cfg.get('pattern')} attached")
    model = hf_causal_lm(hf_config, dtype)
    conv1d = linearize_conv1d(model)
    sp = sparsify(model, **sparsity_cfg)
    load_state(model, strip_module_prefix(ckpt["model"]), where)
    sp.load_state_dict(ckpt["sparsity"])
    model.eval()
    ids = verification_ids(model)
    expected = _logits(model, ids)
    selected, reasons, pattern = set(sp.layers), dict(sp.dense_reasons), sp.pattern
    exclude = list(sp.exclude) + [n for n, r in reasons.items() if not r.startswith("excluded")
                                  and eligibility(model.get_submodule(n), pattern) is None]
    sp.detach()
    layers = [check_layer(name, module.weight, pattern, name in selected, reasons.get(name, ""))
              for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    hf_state = hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, conv1d)
    del model, sp  # the stock model below holds its own copy: one model's memory less at the peak

    plain = hf_causal_lm(hf_config, dtype)
    load_state(plain, hf_state, "the folded weights")
    del hf_state
    _difference(_logits(plain, ids), expected, "the folded stock model's")
    facts = {"task": "lm", "model": model_cfg.get("name"), "model_type": hf_config.get("model_type"),
             "method": sparsity_cfg.get("method"), "pattern": str(pattern), "exclude": exclude, "conv1d": conv1d}
    meta = {"task": "lm", "source": source, "method": sparsity_cfg.get("method"), "step": ckpt.get("step"),
            "epoch": ckpt.get("epoch"), "weights": "model", "model": model_cfg.get("name"),
            "model_type": hf_config.get("model_type"), "conv1d_transposed": bool(conv1d), "max_abs_diff": None}
    return LMFolded(plain, {k: v.detach() for k, v in plain.state_dict().items()}, facts, pattern, layers, meta,
                    tokenizer=lm_tokenizer(model_cfg), input_ids=ids, logits=expected)


# --- writing ------------------------------------------------------------------------------------


def _plain_names(names: Any) -> set[str]:
    """File names (no folders, no ``..``) from an earlier export's ``lbc_export.json``: safe to remove."""
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")} \
        if isinstance(names, list) else set()


def _earlier_files(out: Path) -> set[str]:
    """Files of an earlier export in ``out`` that a new one replaces or removes: an lm export's (its
    ``lbc_export.json`` lists them), a classification export's ``config.yaml`` and ONNX files."""
    names = {ONNX_FILE, f"{ONNX_FILE}.data"}
    with contextlib.suppress(ConfigError):
        read_export_config(out / "config.yaml")
        names.add("config.yaml")
    with contextlib.suppress(OSError, ValueError, AttributeError):
        names |= _plain_names(json.loads((out / LM_FACTS).read_text()).get("files"))
    return names


def write_lm(folded: LMFolded, out: str | Path, *, say: Say = silent) -> dict[str, Any]:
    """Write the export of ``folded`` into ``out`` (see the module's docstring); returns the report.

    The saved directory is reloaded with ``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)``
    before anything in ``out`` changes; its logits must equal the masked model's (else RuntimeError).
    """
    transformers = require_transformers()
    out = _out_dir(out)
    for stale in out.glob(f"{STAGING}*"):  # left by a killed export
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    except OSError as err:
        raise (storage_error(err, out) or err) from None
    try:
        say(f"writing {out} (save_pretrained: model.safetensors, config.json, the tokenizer)")
        with _no_progress_bars():
            try:  # into the staging folder: OUT's earlier files are untouched until every file is there
                folded.model.save_pretrained(staging, safe_serialization=True)
                folded.tokenizer.save_pretrained(staging)
            except (OSError, RuntimeError) as err:  # a full disk, a quota: one line (lbc.io.storage_error)
                raise (storage_error(err, staging) or err) from None
            say("reloading it with AutoModelForCausalLM.from_pretrained and comparing the logits")
            try:
                reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(staging), local_files_only=True)
            except Exception as err:  # noqa: BLE001  (our own files must load: anything else is a bug)
                raise RuntimeError(f"export: the saved model does not load with from_pretrained: {first_line(err)}") from err
        diff = _difference(_logits(reloaded.eval(), folded.input_ids), folded.logits, "from_pretrained's")
        del reloaded
        written = sorted(p.name for p in staging.iterdir() if p.is_file())
        files = [*written, LM_FACTS, "report.json"]
        report = {**folded.report(), "max_abs_diff": diff, "files": files}
        earlier = _earlier_files(out)
        for name in written:
            atomic_write(out / name, lambda tmp, src=staging / name: os.replace(src, tmp))
        facts = {**folded.config, "files": files}
        atomic_write(out / LM_FACTS, lambda p: p.write_text(json.dumps(facts, indent=1) + "\n"))
        for name in earlier - set(files):
            (out / name).unlink(missing_ok=True)
        atomic_write(out / "report.json", lambda p: p.write_text(report_json(report)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def export_lm(ckpt: Mapping[str, Any], source_path: str | Path, out: str | Path, say: Say = silent) -> dict[str, Any]:
    """``lbc-export`` of an lm checkpoint: :func:`fold_lm` then :func:`write_lm`; the report."""
    return write_lm(fold_lm(ckpt, source=str(source_path), say=say), out, say=say)


def linear_weights(report: Mapping[str, Any]) -> tuple[int, int]:
    """(non-zero, total) weights of the report's Conv2d/Linear layers."""
    sizes = [(math.prod(r["shape"]), r["density"]) for r in report.get("layers", [])]
    return sum(round(d * n) for n, d in sizes), sum(n for n, _ in sizes)


# --- lbc-check --------------------------------------------------------------------------------


def lm_facts_beside(weights: str | Path) -> Path | None:
    """The ``lbc_export.json`` beside a weight file (an lm export), or None."""
    path = Path(weights).with_name(LM_FACTS)
    return path if path.is_file() else None


def read_lm_facts(path: str | Path) -> dict[str, Any]:
    """An lm export's ``lbc_export.json`` (one-line ConfigError if it is not one)."""
    path = Path(path)
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is not a readable lbc export file: {first_line(err)}") from None
    ok = (isinstance(facts, dict) and facts.get("task") == "lm" and isinstance(facts.get("pattern"), str)
          and isinstance(facts.get("exclude"), list) and isinstance(facts.get("conv1d"), list))
    if not ok:
        raise ConfigError(f"{str(path)!r} is not an lbc language-model export file (task, pattern, exclude, conv1d)")
    return facts


def lm_check_inputs(
    facts_path: str | Path, state: Mapping[str, torch.Tensor], pattern: str | None = None,
    exclude: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], nn.Module, str, list[str], str]:
    """What ``lbc-check`` checks an lm export with: (weights in the training layout, the model on the meta
    device, pattern, exclude globs, where the layer list comes from).

    The layers are those of ``config.json``'s model (built on the meta device, ``Conv1D`` as ``nn.Linear``:
    the training selection); the ``Conv1D`` weights, (in, out) in the file, are transposed to (out, in) so
    that groups run along the input dimension; a tied weight absent from the file (``lm_head``) is its
    tie's. ``pattern`` and ``exclude`` override the export's.
    """
    transformers = require_transformers()
    facts_path = Path(facts_path)
    facts = read_lm_facts(facts_path)
    folder = facts_path.parent
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):  # sizes only: no memory, no initialisation
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001  (a missing or foreign config.json: transformers' errors vary)
        raise ConfigError(f"{str(folder / 'config.json')!r} does not build a transformers causal LM: "
                          f"{first_line(err)}") from None
    conv1d = linearize_conv1d(model)
    if sorted(conv1d) != sorted(facts["conv1d"]):
        raise ConfigError(f"{str(facts_path)!r} and config.json disagree on the Conv1D layers: "
                          "the files are not of one export")
    linear = hf_state_dict(state, conv1d)  # a transpose is its own inverse: (in, out) back to (out, in)
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for names in tied.values():
        have = next((n for n in names if n in linear), None)
        for name in names if have is not None else ():
            linear.setdefault(name, linear[have])
    source = f"{facts.get('model')} ({facts.get('model_type')}, {facts.get('method')}) from {facts_path}"
    return (linear, model, pattern or facts["pattern"], facts["exclude"] if exclude is None else exclude, source)

"""Ship a trained sparse model: fold the masks into plain weights, check N:M, write safetensors and ONNX.

A run's ``last.pt`` holds the *stored* (unmasked) weights, the method's masks and scores, the
optimizer and the schedule. :func:`fold_checkpoint` rebuilds the model from the run's config,
attaches the same sparsity method, loads the checkpoint and bakes ``B * W`` into the weights
(``SparsityMethod.detach``: the very forward the masked model runs), then loads the result into a
fresh model with no lbc code attached and checks that both give the same outputs.
:func:`write_export` writes ``model.safetensors`` (the model's own state-dict keys),
``config.yaml`` (what :func:`load_exported` needs to build the model again) and ``report.json``
(per layer: pattern, density, N:M or not), plus ``model.onnx`` on request.

:func:`read_weights` and :func:`check_weights` are ``lbc-check``'s core: which layers must be N:M
comes from the model's layer selection (:func:`lbc.sparsity.select_layers`, the training rule:
stem and classifier dense, a layer whose input dimension M does not divide is not eligible), and
groups are ``lbc.sparsity.nm.to_groups``'s, the training grouping.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lbc.errors import ConfigError
from lbc.io import read_pt
from lbc.models import build_model
from lbc.sparsity import sparsify
from lbc.sparsity.nm import NMPattern, eligibility, parse_pattern, to_groups
from lbc.sparsity.selection import select_layers, stem_and_classifier

FILES = ("model.safetensors", "config.yaml", "report.json")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


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

    Refuses detection runs (an MMDetection model is not built from ``model.*`` alone).
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
        raise ConfigError(f"{str(path)!r} is a detection run: lbc-export handles classification models "
                          "(a detector's backbone can be exported from its own checkpoint by mmdet tools)")
    return ckpt, path


def _strip(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state.items()}


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
class LayerCheck:
    """One Conv2d/Linear weight against an N:M pattern (groups along the input dimension, as in training)."""

    name: str
    shape: list[int]
    density: float  # fraction of non-zero weights
    required: bool  # must be N:M (selected by the method / eligible and not excluded)
    reason: str = ""  # why it need not be N:M (excluded, not eligible)
    groups: int = 0  # groups of M (0 when the input dimension does not divide)
    violating: int = 0  # groups with more than N non-zeros
    exact: int = 0  # groups with exactly N non-zeros

    @property
    def nm(self) -> bool:
        """At most N non-zeros in every group (what 2:4 kernels need)."""
        return self.groups > 0 and self.violating == 0

    @property
    def exact_nm(self) -> bool:
        """Exactly N non-zeros in every group (a finished N:M layer at the pattern's density)."""
        return self.groups > 0 and self.exact == self.groups

    def row(self, pattern: NMPattern) -> dict[str, Any]:
        """The report.json entry."""
        out: dict[str, Any] = {"name": self.name, "shape": self.shape, "pattern": str(pattern) if self.required else "dense",
                               "density": round(self.density, 6)}
        if self.groups:
            out |= {"nm": self.nm, "exact_nm": self.exact_nm, "groups": self.groups, "violating_groups": self.violating}
        if self.reason:
            out["reason"] = self.reason
        return out


def check_layer(name: str, weight: torch.Tensor, pattern: NMPattern, required: bool, reason: str = "") -> LayerCheck:
    """Count, vectorised over all groups of ``weight``, those that break ``pattern`` (more than N non-zeros)."""
    weight = weight.detach()
    nonzero = weight != 0
    check = LayerCheck(name, list(weight.shape), float(nonzero.float().mean()) if weight.numel() else 0.0, required, reason)
    if weight.dim() >= 2 and weight.shape[1] % pattern.m == 0 and weight.numel():
        counts = to_groups(nonzero, pattern.m).sum(dim=1)
        check.groups = int(counts.numel())
        check.violating = int((counts > pattern.n).sum())
        check.exact = int((counts == pattern.n).sum())
    return check


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
        required = [c for c in self.layers if c.required]
        sizes = {c.name: math.prod(c.shape) for c in self.layers}
        nonzero = sum(round(c.density * sizes[c.name]) for c in self.layers)
        return {
            **self.meta,
            "pattern": str(self.pattern),
            "nm": bool(required) and all(c.nm for c in required),
            "exact_nm": bool(required) and all(c.exact_nm for c in required),
            "nm_layers": len(required),
            "density": nonzero / max(1, sum(sizes.values())),
            "layers": [c.row(self.pattern) for c in self.layers],
        }


def _verification_input(input_size: list[int] | None) -> torch.Tensor | None:
    if not input_size:
        return None
    return torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))


def fold_checkpoint(ckpt: Mapping[str, Any], *, ema: bool = False, source: str = "", say: Say = _quiet,
                    input_size: list[int] | None = None) -> Folded:
    """The plain model of a training checkpoint (its EMA weights with ``ema``), masks folded in.

    Builds the model from the checkpoint's config, attaches its sparsity method, loads the weights
    and the method's state, runs the masked model (eval mode) on a fixed random input, detaches the
    method (``B * W`` becomes the weight), loads the folded state dict into a freshly built model
    and checks that it gives the same outputs (else RuntimeError: that would be a bug).
    """
    config = ckpt["config"]
    model_cfg, sparsity_cfg = dict(config["model"]), dict(config["sparsity"])
    if ema:
        if not isinstance(ckpt.get("ema"), dict):
            raise ConfigError(f"{source or 'the checkpoint'} kept no EMA weights (the run had trainer.ema=false): "
                              "export without --ema")
        state = _strip(ckpt["ema"])
    else:
        state = _strip(ckpt["model"])
    declared = (config.get("data") or {}).get("num_classes")
    num_classes = infer_num_classes(model_cfg, state, declared)
    input_size = input_size or input_size_of(config)
    say(f"building {model_cfg.get('name')} ({num_classes} classes) with {sparsity_cfg.get('method')} "
        f"{sparsity_cfg.get('pattern')} attached")
    model = build_model(num_classes=num_classes, **model_cfg)
    sp = sparsify(model, **sparsity_cfg)
    load_state(model, state, source or "the checkpoint")
    sp.load_state_dict(ckpt["sparsity"])
    model.eval()
    x = _verification_input(input_size)
    try:
        with torch.no_grad():
            expected = model(x) if x is not None else None
    except (RuntimeError, ValueError, AssertionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{model_cfg.get('name')} cannot run a {list(x.shape)} input: {first}; "
                          "pass the model's input size with --input-size C H W") from None
    selected, reasons = set(sp.layers), dict(sp.dense_reasons)
    pattern = sp.pattern
    exclude = list(sp.exclude) + [n for n, r in reasons.items() if not r.startswith("excluded")
                                  and eligibility(model.get_submodule(n), pattern) is None]
    sp.detach()
    folded = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    plain = build_model(num_classes=num_classes, **model_cfg)
    load_state(plain, folded, "the folded weights")
    plain.eval()
    diff = None
    if x is not None:
        with torch.no_grad():
            got = plain(x)
        diff = float((got - expected).abs().max())
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"export: the folded model's outputs differ from the masked model's (max |diff| {diff:g})")
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


# --- writing ------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then ``os.replace``: never half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the export private to its writer
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
                 say: Say = _quiet) -> dict[str, Any]:
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
    atomic_write(out / "report.json", lambda p: p.write_text(report_json(report)))
    return report


def export_run(source: str | Path, out: str | Path, *, ema: bool = False, onnx: bool = False,
               opset: int = ONNX_OPSET, input_size: list[int] | None = None,
               say: Say = _quiet) -> tuple[Folded, dict[str, Any]]:
    """``lbc-export``'s work: read the run's checkpoint, fold it, write the export into ``out``; (folded, report)."""
    ckpt, path = load_training_checkpoint(source)
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
        raise ConfigError(f"{str(path)!r} is not a readable export config: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not config.get("num_classes"):
        raise ConfigError(f"{str(path)!r} is not an lbc export config (no model section or num_classes)")
    return config


# --- ONNX ---------------------------------------------------------------------------------------


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise ConfigError(f"ONNX export needs the export extra ({err.name} is missing): "
                          "pip install 'lbc[export]'") from None
    return torch.onnx, onnxruntime


def export_onnx(model: nn.Module, input_size: Iterable[int], path: str | Path, *, opset: int = ONNX_OPSET,
                check: bool = True) -> dict[str, Any]:
    """Write ``model`` (eval mode, CPU, float32) as one ONNX file with a dynamic batch dimension.

    torch's exporter (``torch.onnx.export(dynamo=True)``), weights inside the file. With ``check``,
    onnxruntime (CPU) runs it on a random batch of 2 and the largest difference from PyTorch is
    returned; a difference beyond float tolerance is a RuntimeError.
    """
    torch_onnx, ort = _onnx_modules()
    path = Path(path)
    model = model.eval()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch_onnx.export(model, (x,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
                              input_names=["input"], output_names=["output"], dynamic_shapes=({0: batch},))

    atomic_write(path, write)
    (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # an earlier export's external weights
    result: dict[str, Any] = {"file": path.name, "opset": opset, "dynamic_batch": True}
    if check:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        diff = float((torch.from_numpy(got) - expected).abs().max())
        if not torch.allclose(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"export: onnxruntime's outputs differ from PyTorch's (max |diff| {diff:g})")
        result["onnxruntime_max_abs_diff"] = diff
    return result


# --- reading weight files (lbc-check) -----------------------------------------------------------


def _looks_like_safetensors(path: Path) -> bool:
    """8-byte little-endian header length, then a JSON object: safetensors' layout."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and size >= 2


def read_weights(path: str | Path, key: str = "WEIGHTS") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch state dict (weights only), on the CPU.

    A torch file may hold the state dict itself or ``{"model": state_dict}`` (``module.`` prefixes
    are stripped). A missing, corrupt, truncated or foreign file is a one-line ConfigError naming
    ``key``; so is an lbc training checkpoint, whose weights are stored unmasked (export it first).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    where = f"{key}={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            text = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{where} is not a readable safetensors file: {text}") from None
    try:
        state = read_pt(path, key)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 (torch's unpickler on arbitrary bytes: KeyError, IndexError, ...)
        raise ConfigError(f"{where} is neither a safetensors file nor a readable torch file "
                          f"({type(err).__name__} while unpickling)") from None
    if isinstance(state, dict) and "sparsity" in state and isinstance(state.get("model"), dict):
        raise ConfigError(f"{where} is an lbc training checkpoint (its weights are stored unmasked): "
                          "export it first with lbc-export RUN_DIR --out DIR, then check DIR/model.safetensors")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{where} holds no state dict (a {type(state).__name__}); pass a safetensors file or "
                          "a torch file of a state dict")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"{where} holds no tensors")
    if any(".parametrizations." in k for k in tensors):
        raise ConfigError(f"{where} holds a sparsity method's masks and unmasked weights: export the run with "
                          "lbc-export first")
    return tensors


# --- checking -----------------------------------------------------------------------------------


def check_weights(
    state: Mapping[str, torch.Tensor],
    pattern: str | NMPattern,
    model: nn.Module | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[LayerCheck]:
    """Check every Conv2d/Linear weight of ``state`` against ``pattern``, in module order.

    With ``model`` (any device, meta included) the layers and which of them must be N:M are the
    training selection's (``select_layers(model, pattern, exclude)``), and ``state`` must hold each
    layer's weight at its shape. Without a model, every 2-D or 4-D ``*.weight`` tensor is taken as
    a Linear or Conv2d weight, the first one as the stem and the last 2-D one as the classifier
    (kept dense unless ``exclude`` is given), mirroring ``stem_and_classifier``'s fallback.
    """
    pattern = parse_pattern(pattern, key="--pattern")
    if model is not None:
        selection = select_layers(model, pattern, exclude)
        checks = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            key = f"{name}.weight"
            weight = state.get(key)
            if weight is None:
                raise ConfigError(f"the weights have no {key!r}: they are not of this model (see --model)")
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise ConfigError(f"{key} has shape {list(weight.shape)}, the model's is {list(module.weight.shape)}: "
                                  "the weights are not of this model (see --model / --model-option)")
            checks.append(check_layer(name, weight, pattern, name in selection.layers,
                                      selection.dense_reasons.get(name, "")))
        return checks
    names = [k for k, v in state.items() if k.endswith(".weight") and v.dim() in (2, 4)]
    if not names:
        raise ConfigError("the weights hold no Conv2d/Linear weight (no 2-D or 4-D '*.weight' tensor)")
    linears = [k for k in names if state[k].dim() == 2]
    globs = [exclude] if isinstance(exclude, str) else list(exclude) if exclude is not None else None
    default_dense = {names[0], *linears[-1:]}
    checks = []
    for key in names:
        name = key.removesuffix(".weight")
        weight = state[key]
        hit = next((g for g in globs if _glob(name, g)), None) if globs is not None else None
        if globs is None and key in default_dense:
            reason = "excluded by default (stem)" if key == names[0] else "excluded by default (classifier)"
        elif hit is not None:
            reason = f"excluded by {hit!r}"
        elif weight.shape[1] % pattern.m:
            reason = f"input dimension {weight.shape[1]} is not divisible by M={pattern.m}"
        else:
            reason = ""
        checks.append(check_layer(name, weight, pattern, not reason, reason))
    return checks


def _glob(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def format_checks(checks: list[LayerCheck], pattern: NMPattern) -> str:
    """The per-layer table ``lbc-check`` and ``lbc-export`` print."""
    rows = [("layer", "shape", "density", str(pattern), "note")]
    for c in checks:
        if c.required:
            status = "yes" if c.nm else f"NO: {c.violating} of {c.groups} groups"
            note = "exact" if c.exact_nm else ("at most N" if c.nm else "")
        else:
            status, note = "-", c.reason or "dense"
        rows.append((c.name, "x".join(map(str, c.shape)), f"{c.density:.3f}", status, note))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(v.ljust(widths[i]) if i < 4 else v for i, v in enumerate(r)).rstrip() for r in rows)

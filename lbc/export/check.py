"""``lbc-check``'s core: read a weight file, check each Conv2d/Linear weight against an N:M pattern.

Which layers must be N:M comes from the model's layer selection (:func:`lbc.sparsity.select_layers`,
the training rule: stem and classifier dense, a layer whose input dimension M does not divide is not
eligible), and groups are :func:`lbc.sparsity.nm.to_groups`'s, the training grouping.
"""

from __future__ import annotations

import fnmatch
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.io import read_pt, strip_module_prefix
from lbc.sparsity.nm import NMPattern, parse_pattern, to_groups
from lbc.sparsity.selection import select_layers


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


# --- reading weight files -----------------------------------------------------------------------


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
            raise ConfigError(f"{where} is not a readable safetensors file: {first_line(err)}") from None
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
    tensors = {k: v for k, v in strip_module_prefix(state).items() if isinstance(v, torch.Tensor)}
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
        return _check_model_layers(state, pattern, model, exclude)
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


def require_same_keys(state: Mapping[str, torch.Tensor], model: nn.Module, what: str, hint: str) -> None:
    """Refuse, in one line, ``state`` that is not ``model``'s: a missing or unexpected key, or another shape.

    ``--model resnet18`` on a ResNet-34's weights would otherwise be checked on the keys the two share.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    if shapes:
        k = shapes[0]
        why = f"{k} has shape {list(state[k].shape)}, the model's is {list(expected[k].shape)}"
    else:
        why = "; ".join(f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} ({keys[0]!r}{', ...' if len(keys) > 1 else ''})"
                        for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    raise ConfigError(f"{what} are not of this model: {why} (see {hint})")


def _check_model_layers(state: Mapping[str, torch.Tensor], pattern: NMPattern, model: nn.Module,
                        exclude: str | Iterable[str] | None) -> list[LayerCheck]:
    """:func:`check_weights` with a model: its Conv2d/Linear layers, its training selection."""
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


def _glob(name: str, pattern: str) -> bool:
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

"""A detector's backbone from one of our classification runs (dense or N:M sparse), without downloads.

mmdet's configs start the ResNet backbone from ``torchvision://resnet50`` (a download); ours start
from random init or from an lbc classification checkpoint. mmdet's ResNet names its parameters as
torchvision's (and timm's) ResNets do (``conv1``, ``bn1``, ``layerX.Y.convZ/bnZ/downsample``), so the
backbone is the classification model minus its ``fc``.

    payload = convert("runs/r50_lbc")                  # a run dir, its last.pt, or a state-dict file
    save_backbone(payload, "r50_lbc.safetensors")      # or tools/convert_backbone.py
    load_backbone(sparse_detector, "r50_lbc.safetensors")  # SparseDetector.init_weights calls this

A payload is ``{"meta": {...}, "tensors": {name: tensor}}``. ``tensors`` are the backbone's entries of
the classification state dict: dense (stored) weights, BN parameters and statistics, and for each
masked layer the method's own tensors (``<layer>.parametrizations.weight.0.{mask, scores, alive}``).
``meta`` holds the source, the ResNet depth, the source's method and pattern, the method's state
(the classification model's cost bookkeeping dropped; the method's ``carried_state`` says what of
it the detector takes over: LBC's ``removed``, ASP's ``pruned``), its options and the masked layers.
:func:`load_backbone` also takes a classification checkpoint directly (it converts it on the fly),
so ``init_backbone`` may name a run's ``last.pt``.

Masks are kept exactly when the detector trains with the source's method and pattern; otherwise the
detector starts from the masked weights ``B * W`` (what the classification model computed with).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lbc.errors import ConfigError
from lbc.io import atomic_write, read_pt
from lbc.sparsity import METHODS, SparsityMethod
from lbc.sparsity.nm import parse_pattern

log = logging.getLogger(__name__)

FORMAT = "lbc-backbone"
VERSION = 1
META_KEY = "lbc_backbone"  # safetensors metadata entry (JSON) / torch file entry holding the meta
OWN = ".parametrizations.weight.0."  # a method's per-layer tensors: <layer>.parametrizations.weight.0.<name>
_ORIGINAL = ".parametrizations.weight.original"  # the dense weight's key inside a parametrised module
BACKBONE_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
# A method's per-layer tensors that define the mask; others (LBC's grad_accum, an accumulator of the
# gradient criterion) keep the detector's fresh values when the file has none.
DEFINING = ("mask", "scores", "alive")
_COST_KEYS = ("cost_timeline", "density_timeline", "layer_cost")
# (block kind, blocks per stage) -> ResNet depth, as torchvision and mmdet build them.
DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")


def resnet_depth(keys: Any) -> int | None:
    """The ResNet depth a state dict's keys describe (18, 34, 50, 101, 152); None for another layout."""
    keys = list(keys)
    blocks: dict[int, set[str]] = {}
    for k in keys:
        hit = _BLOCK.match(k)
        if hit:
            blocks.setdefault(int(hit.group(1)), set()).add(hit.group(2))
    kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    return DEPTHS.get((kind, tuple(len(blocks.get(i, ())) for i in (1, 2, 3, 4))))


def _where(key: str, path: str | Path) -> str:
    return f"{key}={str(path)!r}"


def _normalise(state: dict[str, Any]) -> dict[str, Any]:
    """Strip DDP's/EMA's ``module.`` prefix; a parametrised weight saved without our hooks gets its dense key."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.endswith(_ORIGINAL):
            k = k[: -len(_ORIGINAL)] + ".weight"
        out[k] = v
    return out


# --- reading --------------------------------------------------------------------------------------


def _read_safetensors(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; one-line ConfigError if it is not a readable one."""
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"{_where(key, path)}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 (SafetensorError, OSError, ...: a broken or truncated file)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{_where(key, path)} is not a readable safetensors file: {first}") from None
    return tensors, meta


def _read(path: Path, key: str) -> Any:
    """The file's contents, weights only: a torch file's object, or ``{"tensors", "meta"}`` of a safetensors one."""
    if path.suffix == ".safetensors":
        tensors, meta = _read_safetensors(path, key)
        if META_KEY in meta:
            try:
                return {META_KEY: json.loads(meta[META_KEY]), "tensors": tensors}
            except json.JSONDecodeError:
                raise ConfigError(f"{_where(key, path)}: its {META_KEY} metadata is not JSON") from None
        return tensors
    return read_pt(path, key)


def _check_payload(obj: dict[str, Any], path: Path, key: str) -> dict[str, Any]:
    """A payload read back from a file, checked: ours, this version, every masked layer's mask present."""
    where = _where(key, path)
    meta, tensors = obj.get(META_KEY), obj.get("tensors")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(tensors, dict):
        raise ConfigError(f"{where} is not a backbone file lbc wrote (no {FORMAT} metadata)")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{where} is a {FORMAT} file of version {meta.get('version')!r}; this lbc reads {VERSION}")
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ConfigError(f"{where} is not a backbone file lbc wrote (an entry of 'tensors' is not a tensor)")
    missing = [layer for layer in meta.get("layers", []) if f"{layer}{OWN}mask" not in tensors]
    if missing:
        raise ConfigError(f"{where} lists layer {missing[0]!r} as masked but holds no mask for it")
    return {"meta": meta, "tensors": tensors}


def convert(checkpoint: str | Path, *, key: str = "checkpoint") -> dict[str, Any]:
    """The backbone init payload of one of our classification checkpoints (read weights-only).

    ``checkpoint``: a classification run directory (its ``last.pt``), a training checkpoint
    (``{"model": state dict, "sparsity": method state, "config": ...}``), a plain state dict
    (``.pt``/``.pth``/``.safetensors``; its method is unknown, so its masks are baked into the
    weights when loaded) or a payload file :func:`save_backbone` wrote (returned as it is).
    Every problem is a one-line ConfigError naming ``key`` and the file.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "last.pt"
    obj = _read(path, key)
    where = _where(key, path)
    if isinstance(obj, dict) and META_KEY in obj:
        return _check_payload(obj, path, key)
    sparsity: dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # our training checkpoint
        state = obj["model"]
        sparsity = obj.get("sparsity") if isinstance(obj.get("sparsity"), dict) else None
        config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        options = config.get("sparsity") if isinstance(config.get("sparsity"), dict) else None
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj  # a plain state dict
    else:
        raise ConfigError(f"{where} is neither an lbc classification checkpoint nor a state dict "
                          f"(it holds a {type(obj).__name__})")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"{where}: its model state dict holds entries that are not tensors")
    state = _normalise(state)
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if k.startswith(BACKBONE_PREFIXES)}
    if "conv1.weight" not in tensors or "layer1.0.conv1.weight" not in tensors:
        raise ConfigError(f"{where} holds no ResNet backbone (no 'conv1.weight' / 'layer1.0.conv1.weight' key): "
                          "convert a torchvision or timm ResNet checkpoint")
    layers = sorted(k[: -len(f"{OWN}mask")] for k in tensors if k.endswith(f"{OWN}mask"))
    missing = [layer for layer in layers if f"{layer}.weight" not in tensors]
    if missing:
        raise ConfigError(f"{where}: layer {missing[0]!r} has a mask but no weight")
    method = str(sparsity["method"]) if sparsity and "method" in sparsity else None
    pattern = str(sparsity["pattern"]) if sparsity and "pattern" in sparsity else None
    cls = _method(method)
    if method is not None and (cls is None or cls.masks_weights) and not layers:
        raise ConfigError(f"{where}: its sparsity state names method {method!r} but the model holds no masks")
    if cls is not None and layers:  # the mask the detector starts from (SR-STE: the top-N of the weight)
        nm = parse_pattern(pattern or "2:4")
        for layer in layers:
            mask = f"{layer}{OWN}mask"
            tensors[mask] = cls.carried_mask(tensors[f"{layer}.weight"], tensors[mask], nm)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(path),
        "depth": resnet_depth(tensors),
        "method": method,
        "pattern": pattern,
        "state": {k: v for k, v in sparsity.items() if k not in _COST_KEYS} if sparsity else None,
        "options": options,
        "layers": layers,
    }
    return {"meta": meta, "tensors": tensors}


def _method(name: str | None) -> type[SparsityMethod] | None:
    """The registered method class called ``name`` (None: unknown or not named)."""
    return METHODS.get(name) if name in METHODS else None


def read_backbone(path: str | Path, key: str = "model.init_backbone") -> dict[str, Any]:
    """A payload from ``path``: a file :func:`save_backbone` wrote, or a classification checkpoint (converted)."""
    return convert(path, key=key)


# --- writing --------------------------------------------------------------------------------------


def save_backbone(payload: dict[str, Any], out: str | Path) -> Path:
    """Write ``payload`` atomically: ``.safetensors`` (tensors + JSON metadata, no pickle) or ``.pt``/``.pth``
    (a dict that loads weights-only). Returns the path written."""
    out = Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise ConfigError(f"--out={str(out)!r}: write a .safetensors (or .pt) file")
    if out.is_dir():
        raise ConfigError(f"--out={str(out)!r} is a directory; name a file")
    meta, tensors = payload["meta"], {k: v.contiguous() for k, v in payload["tensors"].items()}

    def write(tmp: Path) -> None:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        else:
            torch.save({META_KEY: meta, "tensors": tensors}, tmp)

    return atomic_write(out, write)  # lbc's one atomic writer: never half a file, permissions as the umask says


def describe(payload: dict[str, Any]) -> str:
    """One line: depth, conv layers, dense or sparse (method, pattern, masked layers, schedule state), source."""
    meta, tensors = payload["meta"], payload["tensors"]
    convs = sum(1 for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 4)
    depth = f"ResNet-{meta['depth']}" if meta.get("depth") else "ResNet"
    if meta["layers"]:
        carried = (_method(meta["method"]) or SparsityMethod).carried_state(meta.get("state") or {})
        extra = "".join(f", {k} {v}" for k, v in carried.items())
        kind = f"sparse {meta['method'] or 'unknown method'} {meta['pattern'] or ''}".rstrip()
        what = f"{kind} ({len(meta['layers'])} masked layers{extra})"
    else:
        what = "dense"
    return f"{depth} backbone, {convs} conv layers, {what}, from {meta['source']}"


# --- loading into a detector ------------------------------------------------------------------------


def _sparse_layers(sp: Any, backbone: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """The method's reparametrised layers: those inside ``backbone`` (by backbone-relative name), and the
    names of the others (outside the backbone, e.g. a sparse neck)."""
    if sp is None:
        return {}, []
    names = {id(m): n for n, m in backbone.named_modules()}
    inside: dict[str, nn.Module] = {}
    outside: list[str] = []
    for name, module in sp.layers.items():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        if id(module) in names:
            inside[names[id(module)]] = module
        else:
            outside.append(name)
    return inside, outside


def _describe_keys(keys: list[str], what: str) -> str:
    return f"{len(keys)} {what} key(s) (first {keys[0]!r})"


def load_backbone(sparse_detector: Any, path: str | Path, *, key: str = "model.init_backbone") -> dict[str, Any]:
    """Load the backbone payload (or classification checkpoint) at ``path`` into ``sparse_detector``.

    ``sparse_detector`` has ``.detector.backbone`` and ``.sparsity`` (the method attached to the
    detector, or None for dense). With the source's method and pattern, each masked layer's
    tensors (mask; LBC's scores and alive sets) are restored exactly, and so is the method's place
    on its schedule (LBC's ``removed``: after t_f nothing is removed again; ASP's ``pruned``) when
    the detector's sparse layers are exactly the source's masked ones. Otherwise (dense detector,
    another method or pattern) the masked weights ``B * W`` are its dense start, logged in one line.
    Nothing is loaded unless all of it fits; a problem is one ConfigError line naming the file.
    Returns what was done: ``{"masks_kept", "layers", "state_carried"}``.
    """
    payload = read_backbone(path, key)
    meta, tensors = payload["meta"], payload["tensors"]
    where = _where(key, path)
    detector = getattr(sparse_detector, "detector", None)
    backbone = getattr(detector, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"load_backbone: {type(sparse_detector).__name__} has no .detector.backbone module")
    sp = getattr(sparse_detector, "sparsity", None)
    expected = backbone.state_dict()
    mine, src = resnet_depth(expected), meta.get("depth")
    if mine is not None and src is not None and mine != src:
        raise ConfigError(f"{where} holds a ResNet-{src} backbone but the detector's is ResNet-{mine}: "
                          f"set the backbone depth to {src} or convert a ResNet-{mine} checkpoint")
    inside, outside = _sparse_layers(sp, backbone)
    # the method's tensors saved in state dicts (not the non-persistent ones such as LBC's candidates)
    owned = set(sp.owned_tensor_names(backbone)) & set(expected) if sp is not None else set()
    masked = set(meta["layers"])
    same = sp is not None and meta["method"] is not None and meta["method"] == sp.name and meta["pattern"] == str(
        sp.pattern)
    kept = sorted(masked & set(inside)) if same else []
    state: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if OWN in k:
            continue
        layer = k.removesuffix(".weight") if k.endswith(".weight") else None
        if layer in masked and layer not in kept:  # the weight the classification model computed with
            v = v * tensors[f"{layer}{OWN}mask"].to(v.dtype)
        state[k] = v
    for layer in kept:
        for name in sorted(n for n in owned if n.startswith(f"{layer}{OWN}")):
            if name in tensors:
                state[name] = tensors[name]
            elif name.removeprefix(layer + OWN) in DEFINING:
                raise ConfigError(f"{where}: layer {layer!r} is {meta['method']} {meta['pattern']} but the file "
                                  f"has no {name.removeprefix(layer + OWN)!r} for it")
    missing = [k for k in expected if k not in state and k not in owned]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([_describe_keys(missing, "missing")] if missing else []) + (
            [_describe_keys(unexpected, "unexpected")] if unexpected else [])
        raise ConfigError(f"{where} does not fit the detector's backbone: {', '.join(parts)}")
    shapes = [k for k in state if state[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        raise ConfigError(f"{where} does not fit the detector's backbone: {len(shapes)} shape(s) differ (first {k!r}: "
                          f"{list(state[k].shape)} in the file, {list(expected[k].shape)} in the backbone)")
    backbone.load_state_dict(state, strict=False)
    carried = bool(kept) and set(kept) == masked == set(inside) and not outside
    if kept:
        # the detector's own epoch and cost timeline; when carried, the source's place on the schedule
        extra = sp.carry_in((meta.get("state") or {}) if carried else None)
        if not carried:
            differ = sorted(masked ^ set(inside)) + outside
            log.warning("%s: %s %s masks of %d backbone layers kept; the method's schedule state starts fresh: "
                        "the detector's sparse layers differ from the checkpoint's (first: %s)",
                        where, sp.name, sp.pattern, len(kept), differ[0] if differ else "?")
        log.info("%s: %s backbone, %s %s masks of %d layers kept%s", where, _depth_name(src), sp.name, sp.pattern,
                 len(kept), "".join(f", {k} {v}" for k, v in extra.items()))
    elif masked:
        method = f"{sp.name} {sp.pattern}" if sp is not None and sp.masks_weights else "dense"
        log.warning("%s: masks not kept (the checkpoint is %s %s, the detector trains %s): its masked weights "
                    "B*W are the backbone's dense start", where, meta["method"] or "of an unknown method",
                    meta["pattern"] or "", method)
    else:
        log.info("%s: dense %s backbone loaded", where, _depth_name(src))
    return {"masks_kept": bool(kept), "layers": kept, "state_carried": carried}


def _depth_name(depth: int | None) -> str:
    return f"ResNet-{depth}" if depth else "ResNet"

"""Run 2:4 weights on sparse tensor cores: ``lbc.accelerate(model)``.

On a CUDA GPU of compute capability 8.0 or newer (Ampere, Hopper, ...), every ``nn.Linear`` whose
weight is 2:4 along its input dimension (at most 2 non-zeros in every 4 consecutive inputs: the
grouping lbc trains with) gets its weight replaced by ``torch.sparse.to_sparse_semi_structured``'s
compressed tensor, which ``F.linear`` runs with cuSPARSELt (or CUTLASS) 2:4 kernels. 1x1
convolutions (ResNet's bottleneck ``conv1``/``conv3`` and downsample) are first turned into the
same matmul over channels-last pixels (:class:`Conv1x1AsLinear`), so they can use it too.

Constraints, read from ``torch/sparse/semi_structured.py`` (torch 2.13) and checked per layer:
the weight is float16 or bfloat16 (cuSPARSELt also takes int8/float8, which lbc does not make),
2-D, contiguous, on CUDA, and its (out, in) sizes are multiples of the backend's minimum sparse
block: (16, 16) for cuSPARSELt, (32, 64) for CUTLASS at fp16/bf16. Inputs are padded by torch to
the dense minimum (8 x 8). A layer that does not qualify stays as it is, with its reason.

Anywhere else (no CUDA, an older GPU, a model on the CPU, float32 weights without ``dtype``) the
model is left untouched and one line says why. The compressed weights are for inference only
(no gradient); they are not saved in checkpoints: accelerate after loading an export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lbc.sparsity.nm import NMPattern, is_nm

log = logging.getLogger("lbc")

TWO_FOUR = NMPattern(2, 4)
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
# (rows, cols) the sparse operand's sizes must be multiples of, per backend at fp16/bf16; used when
# torch's own table (the backend class's _DTYPE_SHAPE_CONSTRAINTS) cannot be read.
FALLBACK_BLOCK = {"cusparselt": (16, 16), "cutlass": (32, 64)}


class Conv1x1AsLinear(nn.Module):
    """A 1x1 ``nn.Conv2d`` (any stride, no padding, one group) as ``F.linear`` over channels-last pixels.

    The same function as the convolution; the output comes back NCHW-shaped in channels-last
    memory (free for the BatchNorm and convolutions after it). The weight is (out, in) like a
    Linear's, so a 2:4 one can be a semi-structured sparse tensor.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not convertible_conv(conv):
            raise ValueError("Conv1x1AsLinear takes a 1x1 Conv2d with no padding, no dilation and one group")
        self.in_channels, self.out_channels, self.stride = conv.in_channels, conv.out_channels, tuple(conv.stride)
        self.weight = nn.Parameter(conv.weight.detach().flatten(1), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        pixels = x.permute(0, 2, 3, 1)
        if not pixels.is_contiguous():  # the sparse matmul views the input as (pixels, channels)
            pixels = pixels.contiguous()
        return F.linear(pixels, self.weight, self.bias).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def convertible_conv(module: nn.Module) -> bool:
    """A Conv2d that is a plain matmul over pixels: 1x1 kernel, no padding, no dilation, one group."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
            and tuple(module.dilation) == (1, 1) and module.padding in ((0, 0), 0, "valid")
            and not parametrize.is_parametrized(module))


def convs_as_linear(model: nn.Module, only: Callable[[str, nn.Conv2d], bool] | None = None) -> list[str]:
    """Replace the model's 1x1 convolutions (those ``only`` accepts) by :class:`Conv1x1AsLinear`, in place."""
    replaced = []
    for name, module in list(model.named_modules()):
        if convertible_conv(module) and (only is None or only(name, module)):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, Conv1x1AsLinear(module))
            replaced.append(name)
    return replaced


@dataclass
class Acceleration:
    """What :func:`accelerate` did: layers converted, layers left dense (with why), or why nothing ran."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # set when the model was left untouched as a whole
    backend: str | None = None
    dtype: torch.dtype | None = None

    def __bool__(self) -> bool:
        return bool(self.converted)

    def __str__(self) -> str:
        if self.reason:
            return f"lbc.accelerate: nothing converted: {self.reason}; the model is unchanged"
        dtype = str(self.dtype).removeprefix("torch.")
        line = f"lbc.accelerate: {len(self.converted)} layer(s) to 2:4 sparse ({self.backend}, {dtype})"
        if self.skipped:
            first = next(iter(self.skipped.items()))
            line += f"; {len(self.skipped)} left dense (e.g. {first[0]}: {first[1]})"
        return line


def hardware_reason(device: torch.device | str | None = None) -> str | None:
    """Why 2:4 sparse kernels cannot run on ``device`` (default: the current CUDA device); None when they can."""
    if not torch.cuda.is_available():
        return "CUDA is not available (2:4 sparse tensor cores need an NVIDIA GPU of compute capability 8.0 or newer)"
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return f"the model is on {device}, not a CUDA device: move it to the GPU first (model.cuda())"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{name} has compute capability {capability[0]}.{capability[1]}; 2:4 sparse tensor cores need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere, Hopper, ...)")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if backend_name() == "cutlass" and capability[0] != 8:
        return (f"torch here has no cuSPARSELt and its CUTLASS 2:4 kernels are built for compute capability 8.x, "
                f"not {capability[0]}.{capability[1]}")
    return None


def backend_name() -> str:
    """``cusparselt`` when torch has it (what ``to_sparse_semi_structured`` uses), else ``cutlass``."""
    available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)
    return "cusparselt" if available() else "cutlass"


def _backend_class(backend: str) -> Any:
    return {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
            "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}[backend]


def sparse_block(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols): the sparse weight's sizes must be multiples of these (torch's table, per backend and dtype)."""
    try:
        constraint = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS[dtype]
        return int(constraint.sparse_min_rows), int(constraint.sparse_min_cols)
    except (AttributeError, KeyError):
        return FALLBACK_BLOCK[backend]


def layer_reason(weight: torch.Tensor, backend: str, dtype: torch.dtype | None = None) -> str | None:
    """Why this (out, in) weight, cast to ``dtype`` (default: its own), cannot be a 2:4 semi-structured
    tensor; None when it can."""
    dtype = dtype or weight.dtype
    if dtype not in SPARSE_DTYPES:
        return f"weight is {str(dtype).removeprefix('torch.')}, not float16/bfloat16"
    rows, cols = sparse_block(backend, dtype)
    out_f, in_f = weight.shape
    if out_f % rows or in_f % cols:
        return f"shape {out_f}x{in_f} is not a multiple of {rows}x{cols} ({backend})"
    if not is_nm(weight, TWO_FOUR):
        return "weight is not 2:4 along its input dimension"
    return None


def candidates(model: nn.Module, backend: str, dtype: torch.dtype, convs: bool = True) -> tuple[list[str], dict[str, str]]:
    """(layers that can go 2:4 sparse at ``dtype``, {layer: why not}) among the Linear and (with ``convs``)
    1x1 Conv2d layers, in module order; nothing is changed."""
    ok, skipped = [], {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1x1AsLinear) or (convs and convertible_conv(module)):
            weight = module.weight.detach().flatten(1)
        elif isinstance(module, nn.Linear):
            if parametrize.is_parametrized(module):
                skipped[name] = "a sparsity method is attached: detach it (sp.detach()) or load an export"
                continue
            weight = module.weight.detach()
        else:
            continue
        why = layer_reason(weight, backend, dtype)
        if why is None:
            ok.append(name)
        else:
            skipped[name] = why
    return ok, skipped


def _probe(backend: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Run one small 2:4 matmul; the first line of its error if the kernels do not work on this GPU."""
    try:
        dense = torch.tensor([0, 0, 1, 1], dtype=dtype, device=device).tile(64, 16)  # 64 x 64, 2:4
        x = torch.randn(32, 64, dtype=dtype, device=device)
        got = F.linear(x, _backend_class(backend).from_dense(dense))
        if not torch.allclose(got.float(), F.linear(x, dense).float(), rtol=1e-2, atol=1e-2):
            return "a test 2:4 matmul gave wrong results"
    except Exception as err:  # noqa: BLE001 (any kernel or library failure means: not here)
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def accelerate(model: nn.Module, dtype: torch.dtype | None = None, convs: bool = True, quiet: bool = False) -> Acceleration:
    """Convert the model's 2:4 ``nn.Linear`` weights (and 1x1 convolutions, with ``convs``) to sparse tensor cores.

    In place, for inference. ``dtype`` (float16 or bfloat16) casts the whole model first (feed it
    inputs of that dtype); without it the weights must already be fp16/bf16. Where nothing can be
    converted (no suitable GPU, a CPU model, float32 weights) the model is left as it was and the
    returned :class:`Acceleration` holds the reason; one line is logged either way (``quiet``: none).
    """
    result = Acceleration()
    try:
        first = next(model.parameters())
    except StopIteration:
        first = None
    result.reason = hardware_reason(first.device if first is not None else None)
    if result.reason is None and first is None:
        result.reason = "the model has no parameters"
    if result.reason is None and dtype is not None and dtype not in SPARSE_DTYPES:
        result.reason = f"dtype={dtype} is not float16 or bfloat16 (what 2:4 sparse kernels take)"
    if result.reason is None and dtype is None and first.dtype not in SPARSE_DTYPES:
        result.reason = (f"the weights are {str(first.dtype).removeprefix('torch.')}: 2:4 sparse kernels take "
                         "float16 or bfloat16; pass dtype=torch.float16 (or call model.half()) first")
    backend = backend_name()
    if result.reason is None:
        result.reason = _probe(backend, dtype or first.dtype, first.device)
        if result.reason is not None:
            result.reason = f"2:4 kernels ({backend}) failed on {torch.cuda.get_device_name(first.device)}: {result.reason}"
    if result.reason is None:
        result.dtype = dtype or first.dtype
        chosen, result.skipped = candidates(model, backend, result.dtype, convs)
        if not chosen:
            result.reason = "no Linear or 1x1 convolution has a 2:4 weight of a supported shape"
            if result.skipped:
                name, why = next(iter(result.skipped.items()))
                result.reason += f" (e.g. {name}: {why})"
    if result.reason is not None:
        if not quiet:
            log.warning("%s", result)
        return result
    if dtype is not None:
        model.to(dtype)
    result.backend = backend
    wanted = set(chosen)
    convs_as_linear(model, lambda n, m: n in wanted)  # only the ones that go sparse: the rest keep cuDNN's kernels
    cls = _backend_class(backend)
    with torch.no_grad():
        for name in chosen:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(cls.from_dense(module.weight.detach().contiguous()), requires_grad=False)
            result.converted.append(name)
    if not quiet:
        log.info("%s", result)
    return result


def latency_ms(model: nn.Module, x: torch.Tensor) -> float:
    """Milliseconds of one forward (CUDA: synchronised before and after)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
    return (time.perf_counter() - t0) * 1e3


def compare_latency(models: dict[str, Callable[[], Any]], iters: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds of each zero-argument callable, measured round-robin (one of each per round).

    Round-robin spreads the machine's drift (clocks, other work) over all variants alike, so their
    ratios are fairer than back-to-back runs.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + iters):
        for name, run in models.items():
            ms = run()
            if i >= warmup:
                times[name].append(ms)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}

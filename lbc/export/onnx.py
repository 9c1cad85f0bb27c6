"""A plain (folded) model as one ONNX file, checked against PyTorch with onnxruntime (the ``export`` extra)."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError
from lbc.io import atomic_write

ONNX_FILE = "model.onnx"
ONNX_OPSET = 18


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise ConfigError(f"ONNX export needs the export extra ({err.name} is missing): "
                          "pip install 'lbc[export]'") from None
    return torch.onnx, onnxruntime


def export_onnx(model: nn.Module, input_size: Iterable[int], path: str | Path, *, opset: int = ONNX_OPSET,
                check: bool = True, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write ``model`` (eval mode, CPU, float32) as one ONNX file with a dynamic batch dimension.

    torch's exporter (``torch.onnx.export(dynamo=True)``), weights inside the file, ``metadata`` in its
    ``metadata_props`` (what onnxruntime's ``get_modelmeta().custom_metadata_map`` reads). With ``check``,
    onnxruntime (CPU) runs it on a random batch of 2 and the largest difference from PyTorch is
    returned; a difference beyond float tolerance is a RuntimeError, and so is metadata it does not read back.
    """
    torch_onnx, ort = _onnx_modules()
    path = Path(path)
    model = model.eval()
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch_onnx.export(model, (x,), None, dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["output"], dynamic_shapes=({0: batch},))
            program.model.metadata_props.update(metadata or {})
            program.save(str(tmp), external_data=False)

    atomic_write(path, write)
    (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # an earlier export's external weights
    result: dict[str, Any] = {"file": path.name, "opset": opset, "dynamic_batch": True}
    if check:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        stored = session.get_modelmeta().custom_metadata_map
        if any(stored.get(k) != v for k, v in (metadata or {}).items()):
            raise RuntimeError(f"export: onnxruntime does not read back the metadata written into {path.name}")
        (got,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        diff = float((torch.from_numpy(got) - expected).abs().max())
        if not torch.allclose(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"export: onnxruntime's outputs differ from PyTorch's (max |diff| {diff:g})")
        result["onnxruntime_max_abs_diff"] = diff
    return result

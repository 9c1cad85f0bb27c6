"""Test-time size and cost of an N:M model, counted as the paper counts (Table 4).

Parameters: Conv2d/Linear weights and biases (norm layers not counted), a sparse layer's weights
at density N/M. MACs: ``torch.utils.flop_counter`` on one input, a sparse layer's at N/M.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from lbc.flops import count_macs, layer_macs
from lbc.sparsity.base import stored_weight
from lbc.sparsity.nm import NMPattern, parse_pattern
from lbc.sparsity.selection import select_layers


def summarize(
    model: nn.Module,
    pattern: str | NMPattern,
    input_size: tuple[int, int, int] = (3, 224, 224),
    exclude: str | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Per-layer rows and totals for ``model`` made ``pattern`` sparse on the layers a method would
    select (``exclude`` as in :func:`~lbc.sparsity.selection.select_layers`); the model is not changed."""
    pattern = parse_pattern(pattern)
    macs_total, _ = count_macs(model, input_size)
    macs = layer_macs(model, input_size)
    selection = select_layers(model, pattern, exclude)
    rows, params_total, params_nonzero, saved_macs = [], 0, 0, 0.0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        density = pattern.density if name in selection.layers else 1.0
        weight = stored_weight(module)  # no parametrisation's forward runs
        weights = weight.numel()
        bias = module.bias.numel() if module.bias is not None else 0
        params_total += weights + bias
        params_nonzero += round(weights * density) + bias
        saved_macs += macs[name] * (1.0 - density)
        rows.append({
            "name": name,
            "shape": "x".join(str(s) for s in weight.shape),
            "params": weights + bias,
            "macs": macs[name],
            "density": density,
            "note": selection.dense_reasons.get(name, str(pattern)),
        })
    return {
        "rows": rows,
        "totals": {
            "pattern": str(pattern),
            "input_size": list(input_size),
            "params_total": params_total,
            "params_nonzero": params_nonzero,
            "params_with_norm": sum(p.numel() for n, p in model.named_parameters() if _is_model_parameter(n)),
            "flops_dense": macs_total,
            "flops_sparse": round(macs_total - saved_macs),
        },
    }


def _is_model_parameter(name: str) -> bool:
    """Not a parameter a sparsity method added (LBC's scores), which a deployed model does not hold."""
    return ".parametrizations." not in name or name.endswith(".original")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`summarize` rows."""
    header = f"{'layer':<40} {'weight':>16} {'params':>10} {'MACs':>14} {'density':>8}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name']:<40} {r['shape']:>16} {r['params']:>10,} {r['macs']:>14,} {r['density']:>8.4f}  {r['note']}"
        )
    return "\n".join(lines)

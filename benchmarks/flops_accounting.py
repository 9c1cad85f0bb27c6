#!/usr/bin/env python
"""Which training-FLOPs accounting did the paper use? Our figure and candidate accountings, per row.

    python benchmarks/flops_accounting.py                 # Tables 1 and 5, about 2 minutes on 2 busy CPU cores
    python benchmarks/flops_accounting.py --width 0       # full-width layers (slower; same figures)

No training. For every LBC/SR-STE row of Tables 1 and 5 in ``scripts/paper_tables.yaml`` it builds
the row's model (torchvision ResNet-18/50, timm DeiT-small, 224x224), attaches the method with the
row's pattern and schedule through ``lbc.sparsify``, sets the scores at random (seeded; untrained
scores remove candidates in an arbitrary order, and for 2:4 and 2:8 the mask density of a group
with k alive candidates depends on which ones are left), calls ``update`` at every step of the
row's epochs and integrates several accountings over the steps. Table 5's LBC (0, 0) row uses
``removal=released`` (the mask is N:M from the first step, the scores keep learning).

  A  ours: every Conv2d/Linear weighted by its MACs, the method's mask density d for all three
     units (forward 1, backward 2); SR-STE (d + 2) / 3; stem and classifier dense ("as built")
  B  LBC's forward and input gradient at d, weight gradient dense: (2d + 1) / 3
  C  LBC at the fraction of candidates alive (alive / C) instead of the mask density
  D  LBC at a density linear in the candidates removed: N/M + (1 - N/M)(alive - 1)/(C - 1)
  E  LBC at the cubic kept fraction N/M + (1 - N/M)(1 - x)^3, x = (t - t_i)/(t_f - t_i), per step
  E2 E with a dense weight gradient, (2d + 1) / 3
  F  LBC's scores as overhead: while they learn, dL/dB = W * dL/dW_eff needs the dense weight
     gradient, (2d + 1) / 3; d once they are frozen (one candidate left)
  G  A with additive scores (criterion=magnitude: a candidate's value is the sum of its members')
  H  A with the released code's rounding of Eq. 6 (sparsity.rounding=released)
SR-STE is (d + 2) / 3 in every column (E/E2: d on the cubic curve for its gradual rows). A second
table varies the layers counted: only the sparsified layers (stem and classifier sparse too),
and as built plus the MACs outside Conv2d/Linear (DeiT's attention products) at dense cost.

The per-layer masks come from the real method on a copy of the model whose layers keep their input
dimension (so the same layers are selected) but at most ``--width`` outputs (fewer groups: faster;
for 1:M patterns the density is exact at any width); the costs are the full model's MACs.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

import lbc
from lbc.flops import count_macs, layer_macs
from lbc.sparsity import select_layers
from lbc.sparsity.nm import parse_pattern

PAPER_TABLES = Path(__file__).resolve().parents[1] / "scripts" / "paper_tables.yaml"
INPUT = (3, 224, 224)
COLUMNS = ("A", "B", "C", "D", "E", "E2", "F", "G", "H")
FIT = 0.015  # the paper prints two decimals: 0.005 of rounding plus 0.01 of slack


def build(model: str) -> nn.Module:
    """The row's model at 224x224, as the trainer builds it by name."""
    if model == "ResNet-18":
        import torchvision
        return torchvision.models.resnet18()
    if model == "ResNet-50":
        import torchvision
        return torchvision.models.resnet50()
    if model == "DeiT-small":
        import timm
        return timm.create_model("deit_small_patch16_224")
    raise ValueError(f"no builder for {model!r}")


def narrowed(model: nn.Module, width: int) -> nn.Module:
    """Copy of ``model`` whose Conv2d/Linear keep their input size but have at most ``width`` outputs.

    The copy cannot run a forward; it only carries masks, which per group do not depend on how many
    groups a layer has. ``width <= 0``: the model itself.
    """
    if width <= 0:
        return model
    thin = copy.deepcopy(model)
    for name, module in list(thin.named_modules()):
        parent, _, child = name.rpartition(".")
        owner = thin.get_submodule(parent) if parent else thin
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels > width:
            setattr(owner, child, nn.Conv2d(module.in_channels, width, module.kernel_size, module.stride,
                                            module.padding, module.dilation, bias=module.bias is not None))
        elif isinstance(module, nn.Linear) and module.out_features > width:
            setattr(owner, child, nn.Linear(module.in_features, width, bias=module.bias is not None))
    return thin


@dataclass
class Costs:
    """Dense MACs of one image: per Conv2d/Linear layer, and the rest (attention products)."""

    layers: dict[str, float]
    other: float


def measure(model: nn.Module) -> Costs:
    """Per-layer and other MACs; timm's fused attention is unfused so that its products are counted."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    total, _ = count_macs(model, INPUT)
    layers = {n: float(c) for n, c in layer_macs(model, INPUT).items()}
    return Costs(layers, float(total) - sum(layers.values()))


@dataclass
class Row:
    table: str
    model: str
    method: str
    pattern: str
    t_i: float | None
    t_f: float | None
    epochs: int
    paper: float
    label: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    scopes: dict[str, float] = field(default_factory=dict)


def paper_rows(path: Path) -> list[Row]:
    """The LBC and SR-STE rows of Tables 1 and 5 with a printed training-FLOPs figure."""
    try:
        tables = yaml.safe_load(path.read_text())["tables"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        sys.exit(f"cannot read the paper's tables from {path}: {err}")
    rows = []
    for table in ("table1", "table5"):
        for r in tables[table]["rows"]:
            flops = (r.get("paper") or {}).get("flops_train")
            if r["method"] in ("lbc", "srste") and flops is not None:
                model = r.get("model") or "ResNet-50"  # Table 5 is ResNet-50 1:4
                rows.append(Row(table, model, r["method"], r["pattern"], r["t_i"], r["t_f"], int(r["epochs"]),
                                float(flops)))
    return rows


def attach(row: Row, model: nn.Module, seed: int, **extra) -> lbc.SparsityMethod:
    """``lbc.sparsify`` with the row's pattern and schedule; LBC's scores at random (seeded)."""
    # the narrowed copy cannot run a forward: its costs are set from the full model's MACs later
    options = {"pattern": row.pattern, "input_size": "first_forward", **extra}
    if row.t_f is not None:
        options |= {"t_i": row.t_i or 0, "t_f": row.t_f}
    if row.method == "srste":
        return lbc.sparsify(model, "srste", **options)
    if row.t_f == row.t_i and extra.get("criterion", "score") == "score":
        options["removal"] = "released"  # Table 5's (0, 0): the released code's per-step top-k selection
    sp = lbc.sparsify(model, "lbc", **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in sp.score_parameters():
            scores.copy_(torch.rand(scores.shape, generator=generator))
    return sp


@dataclass
class Snapshot:
    """What a step costs depends on: per layer mask density and alive fraction; scores learning."""

    density: dict[str, float]
    alive: dict[str, float]
    learning: bool


def snapshot(sp: lbc.SparsityMethod) -> Snapshot:
    density = sp.densities()
    alive = dict(density)
    states = {n: m.parametrizations.weight[0] for n, m in sp.layers.items() if hasattr(m, "parametrizations")}
    for name, state in states.items():
        if hasattr(state, "alive"):
            alive[name] = float(state.alive.float().mean())
    learning = any(p.requires_grad for p in sp.score_parameters())
    return Snapshot(density, alive, learning)


def drive(row: Row, sp: lbc.SparsityMethod, steps_per_epoch: int) -> list[tuple[float, Snapshot]]:
    """``update`` at every step of the row's epochs; the snapshot of each step (shared while unchanged)."""
    steps, last_key, current = [], None, None
    for step in range(row.epochs * steps_per_epoch):
        epoch = step / steps_per_epoch
        sp.update(epoch)
        key = (tuple(sp.flops.timeline), getattr(sp, "removed", None))
        if key != last_key:
            current, last_key = snapshot(sp), key
        steps.append((epoch, current))
    return steps


def cubic(row: Row, t: float) -> float:
    """Eq. 6's kept fraction N/M + (1 - N/M)(1 - x)^3 at epoch ``t`` (continuous, no rounding)."""
    p = parse_pattern(row.pattern)
    t_i, t_f = row.t_i or 0.0, row.t_f if row.t_f is not None else 0.0
    x = 1.0 if t >= t_f else 0.0 if t <= t_i else (t - t_i) / (t_f - t_i)
    return p.density + (1 - p.density) * (1 - x) ** 3


def integrate(steps: list[tuple[float, Snapshot]], layers: dict[str, float], sparse: set[str],
              unit: Callable[[str, float, Snapshot], float], other: float = 0.0) -> float:
    """Mean step cost over the steps, relative to dense: sum of layer MACs x unit cost (+ other, dense)."""
    total = sum(layers.values()) + other
    spent = 0.0
    for epoch, snap in steps:
        spent += sum(c * (unit(n, epoch, snap) if n in sparse else 1.0) for n, c in layers.items()) + other
    return spent / (total * len(steps))


def evaluate(row: Row, costs: Costs, full: nn.Module, template: nn.Module, args: argparse.Namespace) -> None:
    """Drive the row's method over its epochs and fill ``row.figures`` (columns A-H) and ``row.scopes``."""
    sp = attach(row, copy.deepcopy(template), args.seed)
    sparse = set(sp.layers)
    assert sparse == set(select_layers(full, row.pattern).layers), "narrowing changed the selection"
    sp.flops.set_layer_cost(costs.layers)  # the full model's MACs, for the timeline so far too
    steps = drive(row, sp, args.steps_per_epoch)
    p = parse_pattern(row.pattern)
    c = p.num_candidates
    srste_unit = lambda d: (d + 2) / 3  # noqa: E731
    if row.method == "srste":
        mask = lambda n, t, s: srste_unit(s.density[n])  # noqa: E731
        on_cubic = lambda n, t, s: srste_unit(cubic(row, t))  # noqa: E731
        units = dict.fromkeys(("A", "B", "C", "D", "F", "G", "H"), mask) | {"E": on_cubic, "E2": on_cubic}
    else:
        linear = lambda a: p.density + (1 - p.density) * (a * c - 1) / (c - 1)  # noqa: E731
        units = {
            "A": lambda n, t, s: s.density[n],
            "B": lambda n, t, s: (2 * s.density[n] + 1) / 3,
            "C": lambda n, t, s: s.alive[n],
            "D": lambda n, t, s: linear(s.alive[n]),
            "E": lambda n, t, s: cubic(row, t),
            "E2": lambda n, t, s: (2 * cubic(row, t) + 1) / 3,
            "F": lambda n, t, s: (2 * s.density[n] + 1) / 3 if s.learning else s.density[n],
        }
    for name, unit in units.items():
        row.figures[name] = integrate(steps, costs.layers, sparse, unit)
    ours = sp.train_flops_ratio(row.epochs)  # our figure, as the trainer logs it, is what A integrates
    assert abs(ours - row.figures["A"]) < 1e-9, (ours, row.figures["A"])
    sparse_costs = {n: c for n, c in costs.layers.items() if n in sparse}
    row.scopes["A sparse only"] = integrate(steps, sparse_costs, sparse, units["A"])
    row.scopes["B sparse only"] = integrate(steps, sparse_costs, sparse, units["B"])
    row.scopes["A + other"] = integrate(steps, costs.layers, sparse, units["A"], costs.other)
    row.scopes["B + other"] = integrate(steps, costs.layers, sparse, units["B"], costs.other)
    if row.method == "srste":
        return
    variants = {"G": {"criterion": "magnitude"}, "H": {"rounding": "released"}}
    if p.n == 1:  # one weight per candidate: the mask density is alive / M, whichever candidates go
        row.figures["G"] = row.figures["A"]
        del variants["G"]
    if row.t_i == row.t_f:  # N:M from the first step: no order, no rounding
        row.figures["G"] = row.figures["H"] = row.figures["A"]
        variants = {}
    for column, extra in variants.items():
        variant = attach(row, copy.deepcopy(template), args.seed, **extra)
        variant.flops.set_layer_cost(costs.layers)
        for step in range(row.epochs * args.steps_per_epoch):
            variant.update(step / args.steps_per_epoch)
        row.figures[column] = variant.train_flops_ratio(row.epochs)


def label(row: Row) -> str:
    schedule = f" ({row.t_i:g},{row.t_f:g})" if row.table == "table5" else ""
    return f"{row.table[-1]} {row.model} {'LBC' if row.method == 'lbc' else 'SR-STE'} {row.pattern}{schedule}"


def show(rows: list[Row]) -> None:
    width = max(len(label(r)) for r in rows)
    print("\ntraining FLOPs over dense; table, model, method, pattern (t_i,t_f); columns A-H: see --help")
    print(f"{'row':<{width}}  paper  " + "  ".join(f"{c:>5}" for c in COLUMNS))
    for r in rows:
        cells = "  ".join(f"{r.figures.get(c, math.nan):5.3f}" for c in COLUMNS)
        print(f"{label(r):<{width}}  {r.paper:5.2f}  {cells}")
    scopes = list(rows[0].scopes)
    print("\nlayers counted (A, B): only the sparsified ones, or as built plus the non-Conv/Linear MACs at dense cost")
    print(f"{'row':<{width}}  paper  " + "  ".join(f"{s:>13}" for s in scopes))
    for r in rows:
        print(f"{label(r):<{width}}  {r.paper:5.2f}  " + "  ".join(f"{r.scopes[s]:13.3f}" for s in scopes))
    print(f"\nresiduals (ours - paper): largest |residual| and rows within {FIT} of the paper's figure")
    print(f"{'column':<14} {'LBC max':>8} {'LBC fit':>8} {'SR-STE max':>11} {'SR-STE fit':>11}")
    lbc_rows = [r for r in rows if r.method == "lbc"]
    srste_rows = [r for r in rows if r.method == "srste"]
    candidates = [(c, lambda r, c=c: r.figures.get(c, math.nan)) for c in COLUMNS]
    candidates += [(s, lambda r, s=s: r.scopes[s]) for s in scopes]
    fits = []
    for name, value in candidates:
        res = {m: [value(r) - r.paper for r in group] for m, group in (("lbc", lbc_rows), ("srste", srste_rows))}
        worst = {m: max((abs(x) for x in v), default=math.nan) for m, v in res.items()}
        within = {m: sum(abs(x) <= FIT for x in v) for m, v in res.items()}
        print(f"{name:<14} {worst['lbc']:8.3f} {within['lbc']:>4}/{len(lbc_rows):<3} "
              f"{worst['srste']:11.3f} {within['srste']:>6}/{len(srste_rows):<4}")
        if worst["lbc"] <= FIT and worst["srste"] <= FIT:
            fits.append(name)
    print("\nfits every LBC and SR-STE row:", ", ".join(fits) if fits else "none")
    bounds(rows)


def bounds(rows: list[Row]) -> None:
    """What Table 5's own figures allow, whatever the density curve (paper figures +- 0.005 of rounding)."""
    t5 = {(r.method, r.t_i, r.t_f): r for r in rows if r.table == "table5"}
    need = [("srste", 0, 60), ("srste", 30, 60), ("lbc", 0, 0), ("lbc", 30, 60)]
    if not all(k in t5 for k in need):
        return
    epochs, p = t5[need[0]].epochs, parse_pattern(t5[need[0]].pattern).density
    # SR-STE at (d + 2) / 3, dense before t_i, a density curve of the same shape in x on [t_i, t_f]:
    # figure = (p + 2) / 3 + (t_i (1 - p) + (t_f - t_i) E) / (3 epochs), E = the curve's mean excess over p.
    base = (p + 2) / 3
    excess = (t5[need[0]].paper + 0.005 - base) * 3 * epochs / 60
    most = base + (30 * (1 - p) + 30 * excess) / (3 * epochs)
    print(f"\nTable 5, SR-STE (d + 2) / 3: (0,60) = {t5[need[0]].paper:.2f} allows a mean excess density of at most "
          f"{excess:.3f} on the curve, so (30,60) <= {most:.3f}; the paper prints {t5[need[1]].paper:.2f}")
    # LBC, a step cost that depends on the mask only: a dense step 1, the final 1:4 mask what (0,0) pays per step
    least = (30 * 1 + (epochs - 30) * (t5[need[2]].paper - 0.005)) / epochs
    print(f"Table 5, LBC, a step's cost set by its mask (dense 1, the final mask the (0,0) row's {t5[need[2]].paper:.2f}): "
          f"(30,60) >= {least:.3f}; the paper prints {t5[need[3]].paper:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8, help="outputs per layer of the masked copy (0: full)")
    parser.add_argument("--steps-per-epoch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="ResNet-18,ResNet-50,DeiT-small", help="comma-separated")
    parser.add_argument("--tables", default=str(PAPER_TABLES))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    wanted = {m.strip() for m in args.models.split(",")}
    rows = [r for r in paper_rows(Path(args.tables)) if r.model in wanted]
    started = time.perf_counter()
    models: dict[str, tuple[Costs, nn.Module, nn.Module]] = {}
    for row in rows:
        if row.model not in models:
            full = build(row.model)
            models[row.model] = (measure(full), full, narrowed(full, args.width))
        evaluate(row, *models[row.model], args)
        print(f"{label(row)}: paper {row.paper:.2f}  ours {row.figures['A']:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    show(rows)


if __name__ == "__main__":
    main()

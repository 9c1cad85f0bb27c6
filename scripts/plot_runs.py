#!/usr/bin/env python
"""PNG figures of training runs, one line per run (seeds of a row: thin lines of the row's colour).

    python scripts/plot_runs.py runs/table5/small --out figures/table5

Each RUN_DIR is a run directory (``config.yaml`` + ``metrics.jsonl``) or a folder holding run
directories (searched recursively; a run is a directory with a ``metrics.jsonl``). Writes:

- ``top1.png``: top-1 (or box mAP for detection runs) over epochs;
- ``sparsity.png``: density (kept fraction of the Conv/Linear weights) and alive candidates per
  group (LBC only) over epochs;
- ``flops_top1.png``: final top-1 against training FLOPs (the paper's Fig. 3b), training FLOPs
  normalised by the dense row's epochs as ``collect_results.py`` does.

The legend names each row from ``row.json`` (``<table>/<row>``), else from the config (method, pattern).
Unfinished runs are drawn as far as they got; unreadable ones are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lbc.run.records import METRICS_FILE, read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent


def _collect_module() -> Any:
    """``collect_results.py`` beside this file (for its row.json reading and FLOPs normalisation)."""
    spec = importlib.util.spec_from_file_location("collect_results", HERE / "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("collect_results", module)
    spec.loader.exec_module(module)
    return module


collect = _collect_module()


class PlotRun:
    """One run's per-epoch curves and its legend label (the row's, shared by its seeds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.row = collect.read_json(path / "row.json") if (path / "row.json").is_file() else {}
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
        self.config = config if isinstance(config, dict) else {}
        self.records = read_metrics(path)  # a broken line: MetricsError, a ValueError naming it
        if not self.records:
            raise collect.RunError("metrics.jsonl has no evaluation yet")
        sp = self.config.get("sparsity", {})
        self.method = str(self.row.get("method") or sp.get("method", "?"))
        self.model = str(self.config.get("model", {}).get("name", "?"))
        self.epochs = int(self.config.get("schedule", {}).get("epochs") or self.records[-1]["epoch"])

    @property
    def label(self) -> str:
        if self.row.get("row"):
            return f"{self.row.get('table', '?')}/{self.row.get('scale', 'full')}/{self.row['row']}"
        sp = self.config.get("sparsity", {})
        extra = "" if self.method == "dense" else f" {sp.get('pattern', '')}"
        return f"{self.method}{extra} ({self.path.name})"

    @property
    def group(self) -> str:
        """Seeds of one row share this key (and a colour); a run without row.json is its own group."""
        return self.label if self.row.get("row") else str(self.path)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) where the record has a finite ``key``."""
        pts = [(r["epoch"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    @property
    def accuracy_key(self) -> str:
        return "top1" if any("top1" in r for r in self.records) else "coco/bbox_mAP"


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories given or below the given folders (each holds a metrics.jsonl)."""
    out: list[Path] = []
    for path in paths:
        found = [path] if (path / METRICS_FILE).is_file() else sorted(p.parent for p in path.rglob(METRICS_FILE))
        out += [p for p in found if p not in out]
    return out


def load(paths: Sequence[Path]) -> list[PlotRun]:
    runs = []
    for path in find_runs(paths):
        try:
            runs.append(PlotRun(path))
        except (collect.RunError, OSError, yaml.YAMLError, ValueError) as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
    return runs


def short_label(run: PlotRun, runs: Sequence[PlotRun]) -> str:
    """The row id alone when every run comes from one table and scale, else ``table/scale/row``;
    with the number of seeds drawn."""
    same = len({(r.row.get("table"), r.row.get("scale")) for r in runs}) == 1 and run.row.get("row")
    seeds = sum(r.group == run.group for r in runs)
    return (run.row["row"] if same else run.label) + (f" ({seeds} seeds)" if seeds > 1 else "")


def _colours(runs: Sequence[PlotRun]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len({r.group for r in runs}) <= 10 else "tab20")
    groups = list(dict.fromkeys(r.group for r in runs))
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def _plot_curves(ax: Any, runs: Sequence[PlotRun], key_of: Any, colours: dict[str, Any]) -> None:
    """One thin line per run; the legend names each group once."""
    named: set[str] = set()
    for run in runs:
        x, y = run.series(key_of(run))
        if not x:
            continue
        seeds = sum(r.group == run.group for r in runs)
        label = short_label(run, runs) if run.group not in named else "_nolegend_"
        named.add(run.group)
        ax.plot(x, y, color=colours[run.group], lw=1.0 if seeds > 1 else 1.6, alpha=0.8 if seeds > 1 else 1.0,
                label=label, marker="." if len(x) < 20 else None)


def figures(runs: Sequence[PlotRun]) -> dict[str, Figure]:
    """The three figures (name -> Figure) for ``runs``; each axes holds one Line2D per run that has the data."""
    colours = _colours(runs)
    out: dict[str, Figure] = {}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_curves(ax, runs, lambda r: r.accuracy_key, colours)
    detection = all(r.accuracy_key != "top1" for r in runs)
    ax.set(xlabel="epoch", ylabel="box mAP (coco/bbox_mAP)" if detection else "top-1 (%)",
           title="Validation accuracy after each epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out["top1"] = fig

    fig, (ax_d, ax_a) = plt.subplots(1, 2, figsize=(11, 4.5))
    _plot_curves(ax_d, runs, lambda r: "sparsity/density", colours)
    ax_d.set(xlabel="epoch", ylabel="density (kept / all Conv/Linear weights)", title="Density over epochs")
    alive = "sparsity/alive_per_group"
    _plot_curves(ax_a, [r for r in runs if r.series(alive)[0]], lambda r: alive, colours)
    ax_a.set(xlabel="epoch", ylabel="alive candidates per group", title="LBC: alive candidates per group")
    for ax in (ax_d, ax_a):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    out["sparsity"] = fig

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense_epochs = {r.model: r.epochs for r in runs if r.method == "dense"}
    named: set[str] = set()
    for run in runs:
        final = run.records[-1]
        ratio, acc = final.get(collect.FLOPS_KEY), final.get(run.accuracy_key)
        if not isinstance(ratio, (int, float)) or not isinstance(acc, (int, float)):
            continue
        flops = collect.flops_vs_dense(ratio, run.epochs, dense_epochs.get(run.model, run.epochs))
        label = short_label(run, runs) if run.group not in named else "_nolegend_"
        named.add(run.group)
        ax.plot([flops], [acc], linestyle="none", marker="o", color=colours[run.group], label=label)
    ax.set(xlabel="training FLOPs (× dense row)", ylabel="top-1 (%)" if not detection else "box mAP",
           title="Accuracy vs training FLOPs (cf. the paper's Fig. 3b)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    out["flops_top1"] = fig
    for f in out.values():
        f.tight_layout()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the PNGs, print their paths; the exit status (1: no readable run)."""
    parser = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories, or folders holding them")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNGs (default: figures)")
    args = parser.parse_args(argv)
    runs = load(args.run_dirs)
    if not runs:
        print(f"error: no readable run (a directory with metrics.jsonl) in {', '.join(map(str, args.run_dirs))}",
              file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures(runs).items():
        path = args.out / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

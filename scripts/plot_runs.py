#!/usr/bin/env python
"""PNG figures of training runs, one line per row: the mean over the row's seeds, with a min-max band.

    python scripts/plot_runs.py runs/table5/small/*/seed* --out figures/table5

Each RUN_DIR is a run directory (``config.yaml`` + ``metrics.jsonl``) or a folder holding run
directories (searched recursively; a run is a directory with a ``metrics.jsonl``). Runs whose
``row.json`` name the same row (table, scale, row) are its seeds and make one line; a run without
``row.json`` is a row of its own. Writes:

- ``top1.png``: top-1 (or box mAP for detection runs) over epochs, one column of panels per setting
  (pattern, (t_i, t_f) or criterion) holding its methods' rows and the dense row as a reference: all
  epochs above, the last third zoomed below (methods told apart by colour there);
- ``sparsity.png``: density (kept fraction of the Conv/Linear weights) and alive candidates per
  group (LBC only) over epochs;
- ``flops_top1.png``: final top-1 against training FLOPs (the paper's Fig. 3b), one marker per row
  (mean over seeds, bars: min-max), training FLOPs normalised by the dense row's epochs as
  ``collect_results.py`` does.

A row's colour is its pattern and schedule (criterion, for Table 6) and its line style and marker its
method, so that SR-STE and LBC at the same schedule share a colour and stay told apart where their
lines coincide. Legends name rows by method, pattern and, where rows differ in it, (t_i, t_f) in the
run's own epochs; titles name the table, scale, model and patterns (from ``row.json`` and config).
Unfinished runs are drawn as far as they got; unreadable ones are one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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

# Line style per method: SR-STE a wide translucent line under LBC's thin marked one, so that both
# show where they coincide (Table 5's density at one schedule).
METHOD_STYLE: dict[str, dict[str, Any]] = {
    "dense": {"ls": "-", "lw": 3.0, "alpha": 0.6, "marker": None, "zorder": 1.5},  # wide: visible under ASP at 1.0
    "asp": {"ls": "-.", "lw": 1.6, "marker": "^", "ms": 5, "zorder": 2.0},
    "srste": {"ls": "-", "lw": 5.0, "alpha": 0.35, "marker": None, "solid_capstyle": "butt", "zorder": 1.8},
    "lbc": {"ls": "-", "lw": 1.4, "marker": "o", "ms": 3.5, "zorder": 2.2},
}
OTHER_STYLE: dict[str, Any] = {"ls": "--", "lw": 1.4, "marker": "x", "ms": 5, "zorder": 2.0}
# In top1.png's panels (one per setting) the methods are told apart by colour too.
PANEL_STYLE: dict[str, dict[str, Any]] = {
    "dense": {"color": "black", "ls": "-", "lw": 1.3, "marker": None, "zorder": 1.5},
    "asp": {"color": "tab:green", "ls": "-.", "lw": 1.5, "marker": "^", "ms": 4},
    "srste": {"color": "tab:orange", "ls": "--", "lw": 1.5, "marker": "s", "ms": 3.5},
    "lbc": {"color": "tab:blue", "ls": "-", "lw": 1.5, "marker": "o", "ms": 3.5, "zorder": 2.2},
}
POINT_MARKER = {"dense": "*", "asp": "^", "srste": "s", "lbc": "o"}
DENSE_COLOUR = "black"


class PlotRun:
    """One run's per-epoch curves and what it stands for (its ``row.json`` and config)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.row = collect.read_json(path / "row.json") if (path / "row.json").is_file() else {}
        config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
        self.config = config if isinstance(config, dict) else {}
        for group in ("model", "schedule", "sparsity"):
            if not isinstance(self.config.get(group, {}), dict):
                raise collect.RunError(f"config.yaml {group}={self.config[group]!r} is not a mapping")
        self.records = read_metrics(path)  # a broken line: MetricsError, a ValueError naming it
        if not self.records:
            raise collect.RunError("metrics.jsonl has no evaluation yet")
        sp = self.sparsity
        self.method = str(self.row.get("method") or sp.get("method", "?"))
        self.model = str(self.config.get("model", {}).get("name", "?"))
        epochs = self.config.get("schedule", {}).get("epochs") or self.records[-1]["epoch"]
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise collect.RunError(f"config.yaml schedule.epochs={epochs!r} is not a positive integer")
        self.epochs = epochs

    @property
    def label(self) -> str:
        if self.row.get("row"):
            return f"{self.row.get('table', '?')}/{self.row.get('scale', 'full')}/{self.row['row']}"
        sp = self.config.get("sparsity", {})
        extra = "" if self.method == "dense" else f" {sp.get('pattern', '')}"
        return f"{self.method}{extra} ({self.path.name})"

    @property
    def group(self) -> str:
        """Seeds of one row share this key (one line); a run without row.json is its own group."""
        return self.label if self.row.get("row") else str(self.path)

    @property
    def pattern(self) -> str | None:
        return None if self.method == "dense" else (self.row.get("pattern") or self.sparsity.get("pattern"))

    @property
    def sparsity(self) -> dict[str, Any]:
        sp = self.config.get("sparsity", {})
        return sp if isinstance(sp, dict) else {}

    @property
    def schedule(self) -> tuple[Any, Any]:
        """(t_i, t_f) of the run's config, in its own epochs."""
        return self.sparsity.get("t_i"), self.sparsity.get("t_f")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, values) where the record has a finite ``key``."""
        pts = [(r["epoch"], r[key]) for r in self.records if collect.is_finite_number(r.get(key))]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    @property
    def accuracy_key(self) -> str:
        return "top1" if any("top1" in r for r in self.records) else "coco/bbox_mAP"


class PlotRow:
    """The seeds of one row: their mean curve and min-max band, label, colour and line style."""

    def __init__(self, runs: Sequence[PlotRun]) -> None:
        self.runs = list(runs)
        self.first = self.runs[0]
        self.label = self.first.label
        self.setting = self.label  # what the row shares with other methods' rows (its panel's title)
        self.method_label = self.label  # the method alone (the legend of panels titled by setting)
        self.colour: Any = DENSE_COLOUR

    @property
    def method(self) -> str:
        return self.first.method

    @property
    def colour_key(self) -> str:
        """What the row shares with the other methods' rows of its setting: its row id less the method
        (``lbc_1x4_ti0_tf30`` and ``srste_1x4_ti0_tf30`` share ``1x4_ti0_tf30``)."""
        row = self.first.row.get("row")
        if not row:
            return f"{self.first.pattern}|{self.first.schedule}"
        return "_".join(part for part in str(row).split("_") if part != self.method)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(epochs, mean, min, max, seeds) of ``key`` over the seeds that logged it at each epoch."""
        by_epoch: dict[int, list[float]] = {}
        for run in self.runs:
            for x, y in zip(*run.series(key), strict=True):
                by_epoch.setdefault(x, []).append(y)
        epochs = np.array(sorted(by_epoch), dtype=float)
        values = [np.array(by_epoch[int(e)]) for e in epochs]
        return (epochs, np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
                np.array([v.max() for v in values]), np.array([len(v) for v in values]))

    def final(self, key: str) -> list[float]:
        """``key`` in each seed's last record (where it is a number)."""
        values = (run.records[-1].get(key) for run in self.runs)
        return [float(v) for v in values if collect.is_finite_number(v)]


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories given or below the given folders (each holds a metrics.jsonl)."""
    out: list[Path] = []
    for path in paths:
        found = [path] if (path / METRICS_FILE).is_file() else sorted(p.parent for p in path.rglob(METRICS_FILE))
        out += [p for p in found if p not in out]
    return out


def load(paths: Sequence[Path]) -> list[PlotRun]:
    """The readable runs in ``paths``; each unreadable one is one line on stderr."""
    runs = []
    for path in find_runs(paths):
        try:
            runs.append(PlotRun(path))
        except (collect.RunError, OSError, yaml.YAMLError, ValueError) as err:
            print(f"skipped {path}: {err}", file=sys.stderr)
    return runs


def _number(value: Any) -> str:
    """3 for 3.0, 2.5 for 2.5."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _epoch(value: Any) -> float:
    """A t_i/t_f for sorting (none: first)."""
    return float(value) if isinstance(value, (int, float)) else -1.0


def group_rows(runs: Sequence[PlotRun]) -> list[PlotRow]:
    """The rows of ``runs`` in the paper's order (dense, then by pattern, schedule, method), each with
    a label that tells it from the others and a colour per setting (dense: black)."""
    groups: dict[str, list[PlotRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    rows = [PlotRow(g) for g in groups.values()]
    one_table = len({(r.row.get("table"), r.row.get("scale")) for r in runs}) == 1
    sparse = [r for r in rows if r.method != "dense"]
    schedules = any(len({r.first.schedule for r in sparse if r.method == m}) > 1 for m in ("lbc", "srste"))
    criteria = len({r.first.sparsity.get("criterion") for r in sparse if r.method == "lbc"}) > 1
    for row in rows:
        run, method = row.first, row.method
        if not run.row.get("row"):
            continue  # no row.json: the run's own label
        crit = run.sparsity.get("criterion")
        by_criterion = method == "lbc" and criteria
        name = collect.CRITERION_LABELS.get(crit, crit) if by_criterion else collect.LABELS.get(method, method)
        setting = "dense" if method == "dense" else str(run.pattern)
        name += " (dense)" if method == "dense" else f" {setting}"
        if schedules and method in ("lbc", "srste"):
            when = "({}, {})".format(*(_number(t) for t in run.schedule))
            name, setting = f"{name} {when}", f"{setting}, (t_i, t_f) = {when}"
        setting += f", {name.split(' ')[0]}" if by_criterion else ""
        where = "" if one_table else f"{run.row.get('table')}/{run.row.get('scale', 'full')}: "
        row.label, row.setting = where + name, where + setting
        row.method_label = name.split(" ")[0] + (" (dense)" if method == "dense" else "")
    rows.sort(key=lambda r: (collect.pattern_key(r.first.pattern), *(_epoch(t) for t in r.first.schedule),
                             collect.METHOD_ORDER.get(r.method, 9), r.label))
    keys = list(dict.fromkeys(r.colour_key for r in rows if r.method != "dense"))
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    for row in rows:
        if row.method != "dense":
            row.colour = cmap(keys.index(row.colour_key) % cmap.N)
    return rows


def describe(runs: Sequence[PlotRun], rows: Sequence[PlotRow]) -> tuple[str, str, str]:
    """(title, subtitle, caption) from the runs' row.json and config: the table and scale; the model and
    patterns; the seeds and how (t_i, t_f) relate to the paper's 120-epoch rows."""
    tables = sorted({(r.row["table"], r.row.get("scale", "full")) for r in runs if r.row.get("table")})
    title = ", ".join(f"Table {t.removeprefix('table')} ({s} scale)" for t, s in tables) or "Runs"
    patterns = sorted({r.first.pattern for r in rows if r.first.pattern}, key=collect.pattern_key)
    models = ", ".join(sorted({r.model for r in runs}))
    subtitle = (models + (f", N:M {' / '.join(patterns)}" if patterns else "")
                + (" and dense" if any(r.method == "dense" for r in rows) and patterns else ""))
    parts = []
    seeds = sorted({len(r.runs) for r in rows})
    if seeds != [1]:
        n = str(seeds[0]) if len(seeds) == 1 else f"each row's {seeds[0]}-{seeds[-1]}"
        parts.append(f"line: mean of {n} seeds, band: min-max")
    paper = _paper_schedule(runs)
    if paper:
        parts.append(paper)
    return title, subtitle, "; ".join(parts)


def _paper_schedule(runs: Sequence[PlotRun]) -> str:
    """``(t_i, t_f) in epochs of these 12-epoch runs (the paper's (0, 30) of 120 = (0, 3) here)``,
    when a row's schedule differs from its paper row's (a small-scale run); else ``""``."""
    try:
        paper = {(t, r["id"]): r for t, spec in collect.load_paper().items() for r in spec["rows"]}
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return ""
    found = []
    for run in runs:
        ref = paper.get((run.row.get("table"), run.row.get("paper_row")))
        if not ref or ref.get("t_f") is None or not ref.get("epochs") or run.epochs == ref["epochs"]:
            continue
        if run.method in ("lbc", "srste") and None not in run.schedule:
            found.append((ref, run))
    if not found:
        return ""
    ref, run = min(found, key=lambda f: f[0]["t_f"] == 0)  # an example that shows the scaling: not (0, 0)
    ours = "({}, {})".format(*(_number(t) for t in run.schedule))
    return (f"(t_i, t_f) in epochs of these {run.epochs}-epoch runs (the paper's "
            f"({ref['t_i']}, {ref['t_f']}) of {ref['epochs']} epochs is {ours} here)")


def _style(row: PlotRow) -> dict[str, Any]:
    return dict(METHOD_STYLE.get(row.method, OTHER_STYLE))


def _plot_rows(ax: Axes, rows: Sequence[PlotRow], key_of: Callable[[PlotRow], str], by_method: bool = False) -> None:
    """One line per row (the mean over its seeds) and, for rows of several seeds, a min-max band;
    coloured by setting (styled by method), or ``by_method`` coloured and styled by method alone."""
    for row in rows:
        x, mean, lo, hi, _ = row.curve(key_of(row))
        if not len(x):
            continue
        style = dict(PANEL_STYLE.get(row.method, OTHER_STYLE)) if by_method else {"color": row.colour, **_style(row)}
        style.setdefault("color", row.colour)
        ax.plot(x, mean, label=row.method_label if by_method else row.label, **style)
        if len(row.runs) > 1:
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _legend(fig: Figure, ax: Axes) -> None:
    """The legend right of the plots (it hides no curve)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _finish(fig: Figure, title: str, caption: str) -> None:
    """Title (two lines: what, then model and patterns) on top, caption (what lines and bands are) below."""
    fig.suptitle(title, fontsize=11)
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))


def _top1_figure(runs: Sequence[PlotRun], rows: Sequence[PlotRow], title: str, caption: str,
                 accuracy: str) -> Figure:
    """Accuracy over epochs, one column of panels per setting (pattern, schedule or criterion: the rows
    that share a colour), the dense row in each as a reference: all epochs on top, the last third
    below, zoomed to where the rows end (ten rows in one panel are a tangle at 99%)."""
    settings = list(dict.fromkeys(r.setting for r in rows if r.method != "dense")) or [rows[0].setting]
    dense = [r for r in rows if r.method == "dense"]
    ncols = min(4, len(settings))
    nblocks = -(-len(settings) // ncols)
    fig, axes = plt.subplots(2 * nblocks, ncols, figsize=(3.4 * ncols + 2.4, 5.6 * nblocks + 0.9), squeeze=False,
                             sharey="row")
    key_of = lambda r: r.first.accuracy_key  # noqa: E731
    shortest = min(max(run.series(key_of(r))[0] or [0]) for r in rows for run in r.runs)
    start = max(1, shortest - max(2, shortest // 3))  # the last third of the shortest row, to the end
    late: list[float] = []
    for i, setting in enumerate(settings):
        top, zoom = axes[2 * (i // ncols)][i % ncols], axes[2 * (i // ncols) + 1][i % ncols]
        members = [r for r in rows if r.setting == setting]
        shown = members + [r for r in dense if r not in members]
        for ax in (top, zoom):
            _plot_rows(ax, shown, key_of, by_method=True)
        top.set_title(setting, fontsize=10)
        last = max(run.epochs for r in shown for run in r.runs)
        zoom.set_title(f"epochs {start}-{last}, zoomed", fontsize=9)
        zoom.set_xlim(start - 0.3, last + 0.3)
        for r in members:  # ASP: where the one-shot prune ends the dense epochs
            prune = r.first.sparsity.get("dense_epochs") if r.method == "asp" else None
            if isinstance(prune, (int, float)) and 0 < prune < r.first.epochs:
                for ax in (top, zoom):
                    ax.axvline(prune + 0.5, color="0.5", ls=":", lw=1)
                zoom.annotate(f"ASP prune after epoch {_number(prune)}", (prune + 0.5, 1.0), xycoords=("data", "axes fraction"),
                              xytext=(3, -3), textcoords="offset points", va="top", fontsize=7, color="0.35")
        for r in shown:
            x, _, lo, hi, _ = r.curve(key_of(r))
            late += [v for e, a, b in zip(x, lo, hi, strict=True) if e >= start for v in (a, b)]
    for j in range(len(settings), nblocks * ncols):  # unused panels of the last block
        axes[2 * (j // ncols)][j % ncols].axis("off")
        axes[2 * (j // ncols) + 1][j % ncols].axis("off")
    if late:
        pad = 0.08 * (max(late) - min(late) or 1.0)
        for ax in axes[1::2].flat:
            ax.set_ylim(min(late) - pad, max(late) + pad)
    for ax in axes[:, 0]:
        ax.set_ylabel(accuracy)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
    handles: dict[str, Any] = {}
    for ax in axes[0::2].flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    order = list(dict.fromkeys(r.method_label for r in rows if r.method_label in handles))
    fig.legend([handles[k] for k in order], order, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    _finish(fig, title, caption)
    return fig


def figures(runs: Sequence[PlotRun]) -> dict[str, Figure]:
    """The three figures (name -> Figure) for ``runs``; each curve axes holds one Line2D per row (the
    mean of its seeds) and one min-max band (a fill) per row of several seeds."""
    rows = group_rows(runs)
    prefix, subtitle, caption = describe(runs, rows)
    detection = all(r.accuracy_key != "top1" for r in runs)
    accuracy = "box mAP (coco/bbox_mAP)" if detection else "top-1 (%)"
    out: dict[str, Figure] = {}

    out["top1"] = _top1_figure(runs, rows, f"{prefix}: validation {'box mAP' if detection else 'top-1'} after each "
                                           f"epoch\n{subtitle}", caption, accuracy)

    alive = "sparsity/alive_per_group"
    lbc_rows = [r for r in rows if any(run.series(alive)[0] for run in r.runs)]
    fig, axes = plt.subplots(1, 2 if lbc_rows else 1, figsize=(11 if lbc_rows else 8, 4.6), squeeze=False)
    ax_d = axes[0][0]
    _plot_rows(ax_d, rows, lambda r: "sparsity/density")
    ax_d.set(xlabel="epoch", ylabel="density (kept / all Conv/Linear weights)", title="density")
    if lbc_rows:
        ax_a = axes[0][1]
        _plot_rows(ax_a, lbc_rows, lambda r: alive)
        ax_a.set(xlabel="epoch", ylabel="alive candidates per group", title="LBC: alive candidate combinations per group")
        ax_a.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    _legend(fig, ax_d)
    _finish(fig, f"{prefix}: sparsity over epochs\n{subtitle}", caption)
    out["sparsity"] = fig

    fig, ax = plt.subplots(figsize=(8, 4.8))
    dense_epochs = {r.model: r.epochs for r in runs if r.method == "dense"}
    for row in rows:
        pts = [(collect.flops_vs_dense(run.records[-1][collect.FLOPS_KEY], run.epochs,
                                       dense_epochs.get(run.model, run.epochs)), run.records[-1][run.accuracy_key])
               for run in row.runs
               if collect.is_finite_number(run.records[-1].get(collect.FLOPS_KEY))
               and collect.is_finite_number(run.records[-1].get(run.accuracy_key))]
        if not pts:
            continue
        flops, acc = np.array(pts, dtype=float).T
        y = acc.mean()
        bar = [[max(0.0, y - acc.min())], [max(0.0, acc.max() - y)]]  # equal seeds: the mean may round past them
        ax.errorbar([flops.mean()], [y], yerr=bar, color=row.colour,
                    marker=POINT_MARKER.get(row.method, "x"), ms=9 if row.method == "dense" else 7, ls="none",
                    elinewidth=1.2, capsize=0, label=row.label)
    ax.set(xlabel="training FLOPs (× dense row)", ylabel=accuracy)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    what = caption.replace("line: mean", "marker: mean").replace("band: min-max", "bar: min-max")
    _finish(fig, f"{prefix}: final {'box mAP' if detection else 'top-1'} vs training FLOPs (cf. the paper's "
                 f"Fig. 3b)\n{subtitle}", what)
    out["flops_top1"] = fig
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the PNGs, print their paths; the exit status (1: no readable run)."""
    parser = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories, or folders holding them")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNGs (default: figures)")
    args = parser.parse_args(argv)
    problem = out_problem(args.out)
    if problem:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    runs = load(args.run_dirs)
    if not runs:
        print(f"error: no readable run (a directory with metrics.jsonl) in {', '.join(map(str, args.run_dirs))}",
              file=sys.stderr)
        return 1
    path = args.out
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures(runs).items():
            path = args.out / f"{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            print(path)
    except OSError as err:  # not writable, the disk is full
        print(f"error: cannot write {path}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def out_problem(out: Path) -> str | None:
    """Why the PNGs cannot go to folder ``out`` (it, or a folder above it, is a file), else None."""
    for at in (out, *out.parents):
        if at.exists() or at.is_symlink():
            if at.is_dir():
                return None
            return "is a file; give a folder for the PNGs" if at == out else f"{at} is a file, not a folder"
    return None


if __name__ == "__main__":
    sys.exit(main())

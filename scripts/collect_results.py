#!/usr/bin/env python
"""Print the paper's tables in Markdown with our runs' values beside the paper's.

    python scripts/collect_results.py runs/                         # every full-scale table
    python scripts/collect_results.py runs/ --scale small --table table1 table5 --out small.md

Reads the run directories the launchers make, ``<root>/<table>/<scale>/<row id>/seed<k>/`` (any
directory below ``RUN_ROOT`` holding a ``row.json``), each with the trainer's ``config.yaml`` and
``metrics.jsonl`` (read with :func:`lbc.run.records.read_metrics`, the schema every task writes).
Seeds of one row are pooled: mean and spread (sample standard deviation by
default, ``--spread minmax`` for the range). Each measured column is three adjacent columns: ours,
the paper's (``scripts/paper_tables.yaml``) and ours minus the paper's. A row without a finished
run is blank, never zero. On stderr, one line each: an unfinished or unreadable run directory, a row
without any run (with the command that runs it), and a table without a run at this scale that has
some at the other (a forgotten ``--scale small``). Table 4's Params/FLOPs (Test) print in the unit
that shows the column's smallest value (e.g. MFLOPs for the small model), named in the header; the
paper's values are converted to it.

Full scale: the rows are the paper's (paper-only rows such as DNW or RigL stay blank on our side).
Small scale: the rows are the table's ``small`` list in ``paper_tables.yaml`` (and any other row the
runs' ``row.json`` name), each beside the paper row its ``paper_row`` names (blank when null).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lbc.run.records import METRICS_FILE, MetricsError, read_metrics

HERE = Path(__file__).resolve().parent
PAPER_TABLES = HERE / "paper_tables.yaml"
SCALES = ("full", "small")
METHOD_ORDER = {"dense": 0, "asp": 1, "srste": 2, "lbc": 3}
LABELS = {"dense": "Baseline", "asp": "ASP", "srste": "SR-STE", "lbc": "LBC"}
CRITERION_LABELS = {"score": "S (LBC)", "score_inverse": "S-inverse", "magnitude": "Magnitude", "gradient": "Gradient"}
DESCRIPTIVE = ("model", "label", "pattern", "t_i", "t_f", "structured")  # shown once, not compared
NO_DIFF = ("epochs",)  # compared side by side, without a difference column
# At small scale accuracy (and Table 4's test size and cost) is of another model and data set than the paper's: side by side
# for the layout, never subtracted. Training FLOPs are ratios to dense, comparable at any scale.
SMALL_NO_DIFF = ("top1", "top1_best", "bbox_map", "segm_map", "params_test", "flops_test")
OURS_ONLY = ("top1_best",)  # the paper has no such column
FLOPS_KEY = "sparsity/train_flops_ratio"


class RunError(Exception):
    """A run directory that cannot be used (unfinished, unreadable): its one-line reason."""


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One seed's run directory: its row (``row.json``), resolved config and final metrics."""

    path: Path
    row: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]]
    epochs: int  # the schedule's length (config.yaml), which the last record reached

    @property
    def final(self) -> dict[str, Any]:
        """The last evaluation's record."""
        return self.records[-1]

    @property
    def method(self) -> str:
        return str(self.row.get("method") or self.config.get("sparsity", {}).get("method", "dense"))

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path.name} unreadable ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path.name} is not a JSON object")
    return data


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` records, in order; a broken line is a RunError naming it."""
    try:
        return read_metrics(run_dir)
    except MetricsError as err:
        raise RunError(str(err)) from None


def read_run(path: Path) -> Run:
    """Read one run directory; RunError (one line) if it is not a finished, readable run."""
    row = read_json(path / "row.json") if (path / "row.json").is_file() else {}
    if not (path / "config.yaml").is_file():
        raise RunError("not started (no config.yaml)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RunError(f"config.yaml unreadable ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise RunError("config.yaml is not a mapping")
    epochs = config.get("schedule", {}).get("epochs") if isinstance(config.get("schedule"), dict) else None
    if not isinstance(epochs, int) or epochs <= 0:
        raise RunError(f"config.yaml schedule.epochs={epochs!r} is not a positive integer")
    if not (path / METRICS_FILE).is_file():
        raise RunError(f"unfinished (no evaluation yet, 0/{epochs} epochs)")
    for group in ("model", "data", "sparsity"):
        if not isinstance(config.get(group, {}), dict):
            raise RunError(f"broken: config.yaml {group}={config[group]!r} is not a mapping")
    records = read_records(path)
    last = records[-1]["epoch"] if records else 0
    if last < epochs:
        raise RunError(f"unfinished ({last}/{epochs} epochs)")
    for key, value in records[-1].items():
        if is_measured(key) and not is_finite_number(value):
            shown = "null (NaN or inf when it was logged)" if value is None else repr(value)
            raise RunError(f"broken: the last record's {key} is {shown}, not a finite number")
    return Run(path, row, config, records, epochs)


# The last record's values a table shows: a run whose figure is NaN, inf or not a number is broken, not finished.
MEASURED = ("top1", "top5", "coco/bbox_mAP", "coco/segm_mAP", "sparsity/density")


def is_measured(key: str) -> bool:
    return key in MEASURED or key.startswith(FLOPS_KEY)


def is_finite_number(value: Any) -> bool:
    """An int or float that is finite (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory below ``root`` (``root`` itself included): those holding a ``row.json``."""
    return sorted({p.parent for p in root.rglob("row.json")})


def load_runs(root: Path, warn: Any = None) -> tuple[list[Run], list[tuple[Path, dict[str, Any], str]]]:
    """The usable runs below ``root``, and (path, row, reason) for each that is not (``warn`` gets one line each)."""
    runs, bad = [], []
    for path in find_run_dirs(root):
        try:
            runs.append(read_run(path))
        except RunError as err:
            try:
                row = read_json(path / "row.json")
            except RunError:
                row = {}
            bad.append((path, row, str(err)))
            if warn is not None:
                resumable = str(err).startswith(("unfinished", "not started")) and row.get("table") and row.get("row")
                again = (f" (continue: {run_command(row['table'], scale_of(row), root, row['row'], row.get('seed'))})"
                         if resumable else "")
                warn(f"skipped {path}: {err}{again}")
    return runs, bad


# --- values of one run ----------------------------------------------------------------------------


def metric(run: Run, key: str, dense_epochs: dict[str, int], summaries: dict[Any, dict[str, float]]) -> float | None:
    """Run ``run``'s value of column ``key`` (None: the run has none); units as in paper_tables.yaml."""
    final = run.final
    if key == "top1":
        return final.get("top1")
    if key == "top1_best":
        values = [r["top1"] for r in run.records if is_finite_number(r.get("top1"))]
        return max(values) if values else None
    if key == "epochs":
        return float(run.epochs)
    if key.startswith("flops_train"):
        ratio = final.get(FLOPS_KEY + key.removeprefix("flops_train"))
        if ratio is None:
            return None
        return flops_vs_dense(ratio, run.epochs, dense_epochs.get(run.model, run.epochs))
    if key in ("bbox_map", "segm_map"):
        value = final.get(f"coco/{key.split('_')[0]}_mAP")
        return None if value is None else 100.0 * value
    if key == "sparsity":
        density = final.get("sparsity/density")
        return None if density is None else 100.0 * (1.0 - density)
    if key in ("params_test", "flops_test"):
        totals = inference_cost(run, summaries)
        return None if totals is None else totals[key]
    return final.get(key)


def flops_vs_dense(ratio: float, epochs: int, dense_epochs: int) -> float:
    """A run's logged training-FLOPs ratio (over a dense run as long as itself) as a multiple of the
    dense row's training FLOPs: ASP's 200 epochs at ``ratio`` cost ``ratio * 200 / 120`` of the
    120-epoch dense baseline (Table 1's 1.24x)."""
    return ratio * epochs / dense_epochs


def inference_cost(run: Run, cache: dict[Any, dict[str, float]]) -> dict[str, float] | None:
    """Table 4's Params (M) and FLOPs (G, multiply-accumulates of one image) of the run's model at its
    pattern, counted by :func:`lbc.summary.summarize` (what ``lbc-summary`` prints) from ``config.yaml``."""
    model_cfg, data, sp = run.config.get("model", {}), run.config.get("data", {}), run.config.get("sparsity", {})
    dense = run.method == "dense"
    pattern = "2:4" if dense else sp.get("pattern")
    size = tuple(data.get("input_size") or (3, 224, 224))
    key = (json.dumps(model_cfg, sort_keys=True), data.get("num_classes"), pattern, size, json.dumps(sp.get("exclude")))
    if key not in cache:
        from lbc.errors import ConfigError
        from lbc.models import build_model
        from lbc.summary import summarize

        try:
            model = build_model(num_classes=int(data.get("num_classes", 1000)), **model_cfg)
            totals = summarize(model, pattern, size, sp.get("exclude"))["totals"]
        except (ConfigError, TypeError, ValueError, RuntimeError) as err:
            print(f"no Params/FLOPs (Test) for {run.path}: {str(err).splitlines()[0] if str(err) else err!r}",
                  file=sys.stderr)
            cache[key] = None
        else:
            params = totals["params_total"] if dense else totals["params_nonzero"]
            flops = totals["flops_dense"] if dense else totals["flops_sparse"]
            cache[key] = {"params_test": params / 1e6, "flops_test": flops / 1e9}
    return cache[key]


# --- pooling seeds ---------------------------------------------------------------------------------


@dataclass
class Cell:
    """A column's pooled value over the seeds of one row."""

    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    def spread(self, kind: str) -> tuple[float, ...] | None:
        """Sample standard deviation (``std``, n >= 2) or (min, max) (``minmax``); None for one value."""
        if self.n < 2:
            return None
        return (statistics.stdev(self.values),) if kind == "std" else (min(self.values), max(self.values))


def pool(runs: Sequence[Run], key: str, dense_epochs: dict[str, int], summaries: dict[Any, Any]) -> Cell:
    """The finite values of column ``key`` over ``runs`` (a NaN/inf top-1 is logged as null: not pooled)."""
    values = (metric(r, key, dense_epochs, summaries) for r in runs)
    return Cell([float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)])


# --- formatting ---------------------------------------------------------------------------------------

DECIMALS = {"top1": 2, "top1_best": 2, "bbox_map": 1, "segm_map": 1, "sparsity": 1, "epochs": 0}
PAPER_DECIMALS = {"top1": 1, "top1_best": 1, "bbox_map": 1, "segm_map": 1, "sparsity": 0, "epochs": 0}
# Table 4's sizes, in paper_tables.yaml's unit (the first) and the smaller ones a column may need: the small
# model's 0.0012 GFLOPs print as 1.23M, never as 0.001G.
SIZE_UNITS = {"params_test": ("M", "K"), "flops_test": ("G", "M", "K")}
SMALLEST_SHOWN = 0.1  # a size column's smallest value is at least this in its unit (else the next smaller unit)


@dataclass(frozen=True)
class Style:
    """How one measured column prints: unit suffix, ``factor`` from paper_tables.yaml's unit to it, and
    the decimals of ours and of the paper's (converted) values."""

    unit: str = ""
    factor: float = 1.0
    decimals: int = 2
    paper_decimals: int = 2


def column_style(key: str, values: Iterable[float] = ()) -> Style:
    """The style of column ``key``; a size column (Params/FLOPs) takes the unit in which ``values``' smallest
    nonzero magnitude is at least 0.1 and the decimals that show it to 3 significant digits."""
    if key.startswith("flops_train"):
        return Style("×", 1.0, 2, 2)
    if key not in SIZE_UNITS:
        return Style("", 1.0, DECIMALS.get(key, 2), PAPER_DECIMALS.get(key, 2))
    units, paper_d = SIZE_UNITS[key], PAPER_DECIMALS.get(key, 2)
    sizes = [abs(v) for v in values if v and math.isfinite(v)]
    if not sizes:
        return Style(units[0], 1.0, 3, paper_d)
    smallest, step = min(sizes), 0
    while step < len(units) - 1 and smallest * 1000.0 ** step < SMALLEST_SHOWN:
        step += 1
    factor = 1000.0 ** step
    return Style(units[step], factor, max(0, 2 - math.floor(math.log10(smallest * factor))), max(0, paper_d - 3 * step))


def column_header(header: str, key: str, style: Style) -> str:
    """``header`` with its ``[unit]`` replaced by the column's unit (paper_tables.yaml names the base unit)."""
    if key not in SIZE_UNITS:
        return header
    base = f"[{SIZE_UNITS[key][0]}]"
    return header.replace(base, f"[{style.unit}]") if base in header else f"{header} [{style.unit}]"


def fmt(value: float | None, style: Style, signed: bool = False) -> str:
    if value is None:
        return ""
    v = value * style.factor
    return (f"{v:+.{style.decimals}f}" if signed else f"{v:.{style.decimals}f}") + style.unit


def fmt_paper(value: float | None, style: Style) -> str:
    """A paper value with the decimals the paper prints (fewer when converted to a smaller unit)."""
    if value is None:
        return ""
    return f"{value * style.factor:.{style.paper_decimals}f}{style.unit}"


def fmt_cell(cell: Cell, key: str, spread: str, row_n: int, style: Style | None = None) -> str:
    """``mean ± std`` or ``mean [min, max]``, plus ``(n=k)`` when fewer runs than the row's fed it."""
    if cell.mean is None:
        return ""
    style = style or column_style(key, cell.values)
    text = fmt(cell.mean, style)
    s = cell.spread(spread)
    if s is not None and key != "epochs":
        d, f = style.decimals, style.factor
        text += f" ± {s[0] * f:.{d}f}" if spread == "std" else f" [{s[0] * f:.{d}f}, {s[1] * f:.{d}f}]"
    if cell.n != row_n:
        text += f" (n={cell.n})"
    return text


def fmt_plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- one table ---------------------------------------------------------------------------------------------


def pattern_key(pattern: Any) -> tuple[float, int]:
    """Dense first, then sparser patterns; equal density: smaller M first (the paper's order: 2:4, 1:4, 2:8, 1:16)."""
    if not pattern:
        return (-2.0, 0)
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
        return (-n / m, m)
    except ValueError:  # not N:M: last
        return (0.0, 0)


def small_rows(runs: Sequence[Run], bad: Sequence[tuple[Path, dict[str, Any], str]],
               by_criterion: bool = False, expected: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The small-scale rows: every row of ``expected`` (paper_tables.yaml's ``small`` list, in its order,
    which is the paper's), then any other row the runs name, described from their ``row.json`` and config
    (LBC rows labelled by their criterion when ``by_criterion``, as Table 6 does). A row without a run
    is still a (blank) row."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        sp = run.config.get("sparsity", {})
        rows.setdefault(run.row.get("row", run.path.parent.name), {
            "method": run.method, "pattern": None if run.method == "dense" else run.row.get("pattern", sp.get("pattern")),
            "model": run.model, "t_i": sp.get("t_i"), "t_f": sp.get("t_f"), "criterion": sp.get("criterion"),
            "paper_row": run.row.get("paper_row"), "label": run.row.get("label"),
        })
    described = [row for _, row, _ in bad if row.get("row")] + [{"row": r["id"], **r} for r in expected]
    for row in described:  # unfinished runs' rows, then rows without any run
        rows.setdefault(row["row"], {"method": row.get("method") or "?", "pattern": row.get("pattern"), "model": "",
                                     "t_i": None, "t_f": None, "criterion": row.get("criterion"),
                                     "paper_row": row.get("paper_row"), "label": row.get("label")})
    out = []
    for row_id, row in rows.items():
        named = row["method"] == "lbc" and (by_criterion or row["criterion"] not in (None, "score"))
        label = row["label"] or (CRITERION_LABELS.get(row["criterion"], LABELS["lbc"]) if named
                                 else LABELS.get(row["method"], row["method"]))
        out.append({**row, "id": row_id, "label": label})
    rank = {r["id"]: i for i, r in enumerate(expected)}
    order = lambda r: (rank.get(r["id"], len(rank)), pattern_key(r["pattern"]), r["t_i"] or 0,  # noqa: E731
                       r["t_f"] or 0, METHOD_ORDER.get(r["method"], 9), str(r["criterion"]), r["id"])
    return sorted(out, key=order)


def run_command(table_id: str, scale: str, root: Path | None, row_id: str, seed: Any = None) -> str:
    """The launcher command that (re)runs one row (one seed) of a table into ``root``."""
    cmd = f"bash scripts/{table_id}.sh" + (" --scale small" if scale == "small" else "") + f" --rows {row_id}"
    cmd += "" if seed is None else f" --seeds {seed}"
    return cmd + ("" if root is None or Path(root) == Path("runs") else f" --out {root}")


def scale_of(row: dict[str, Any]) -> str:
    """The scale a run's ``row.json`` says (full when it says none)."""
    return str(row.get("scale") or "full")


def dense_epochs_of(runs: Sequence[Run], paper_rows: Sequence[dict[str, Any]], scale: str) -> dict[str, int]:
    """Epochs of each model's dense row (keyed by the config's model name): our dense runs' schedule,
    else at full scale the paper's dense row for the model of the run's row; a model with neither is
    not normalised."""
    out = {r.model: r.epochs for r in runs if r.method == "dense"}
    if scale != "full":
        return out
    by_id = {r["id"]: r for r in paper_rows}
    dense = {r["model"]: int(r["epochs"]) for r in paper_rows if r["method"] == "dense" and r.get("epochs")}
    for run in runs:
        paper_model = (by_id.get(run.row.get("row") or "") or {}).get("model")
        if run.model not in out and paper_model in dense:
            out[run.model] = dense[paper_model]
    return out


def render_table(table_id: str, spec: dict[str, Any], runs: Sequence[Run], bad: Sequence[tuple[Path, dict, str]],
                 scale: str, spread: str = "std", best: bool = False, sources: bool = False,
                 summaries: dict[Any, Any] | None = None, root: Path | None = None,
                 warn: Callable[[str], None] | None = None) -> str:
    """One table in Markdown: descriptive columns, then ours / paper / difference per measured column.
    ``warn`` gets one line per row that has no run (what to run to fill it)."""
    summaries = {} if summaries is None else summaries
    runs = [r for r in runs if r.row.get("table") == table_id and scale_of(r.row) == scale]
    bad = [b for b in bad if b[1].get("table") == table_id and scale_of(b[1]) == scale]
    by_row: dict[str, list[Run]] = {}
    for run in runs:
        by_row.setdefault(run.row.get("row", run.path.parent.name), []).append(run)
    found: dict[str, int] = {}  # run directories per row, finished or not
    for row_id in [b[1].get("row") for b in bad] + [r.row.get("row", r.path.parent.name) for r in runs]:
        found[row_id] = found.get(row_id, 0) + 1

    paper_rows = spec["rows"]
    paper_by_id = {r["id"]: r for r in paper_rows}
    if scale == "full":
        rows = [{**r, "paper_row": r["id"]} for r in paper_rows]
        rows += [r for r in small_rows(runs, bad, table_id == "table6") if r["id"] not in paper_by_id]  # not in the paper
    else:
        rows = small_rows(runs, bad, table_id == "table6", spec.get("small") or ())
    dense_epochs = dense_epochs_of(runs, paper_rows, scale)
    if warn is not None:
        for row in rows:
            if found.get(row["id"]) or (scale == "full" and not row.get("preset")):  # paper-only rows: nothing to run
                continue
            where = (root or Path("runs")) / table_id / scale / row["id"]
            warn(f"{table_id} {row['id']}: no {'readable ' if where.exists() else ''}run under {where} "
                 f"(run: {run_command(table_id, scale, root, row['id'])})")

    columns = list(spec["columns"])
    flops_extra = sorted({k.removeprefix(FLOPS_KEY) for r in runs for k in r.final
                          if k.startswith(FLOPS_KEY) and k != FLOPS_KEY})
    keys = [c["key"] for c in columns]
    if "flops_train" in keys:  # a second logged training-FLOPs figure, if the runs have one
        at = keys.index("flops_train") + 1
        columns[at:at] = [{"key": f"flops_train{s}", "header": f"FLOPs (Train, {s.strip('_')})"} for s in flops_extra]
    if best and "top1" in keys:
        columns.insert(keys.index("top1") + 1, {"key": "top1_best", "header": "Best Top-1 (%)"})

    measured = [c["key"] for c in columns if c["key"] not in DESCRIPTIVE]
    cells_of = {(row["id"], key): pool(by_row.get(row["id"], []), key, dense_epochs, summaries)
                for row in rows for key in measured}
    papers = {row["id"]: (paper_by_id.get(row.get("paper_row") or "") or {}).get("paper", {}) for row in rows}
    styles = {}
    for key in measured:
        ours = [cells_of[row["id"], key].mean for row in rows if cells_of[row["id"], key].mean is not None]
        theirs = [p[key] for p in papers.values() if isinstance(p.get(key), (int, float))]
        styles[key] = column_style(key, ours or theirs)

    no_diff = NO_DIFF + (SMALL_NO_DIFF if scale == "small" else ())
    header = []
    for c in columns:
        if c["key"] in DESCRIPTIVE:
            header.append(c["header"])
        else:
            header += [f"{column_header(c['header'], c['key'], styles[c['key']])} ours"]
            header += [] if c["key"] in OURS_ONLY else ["paper"]
            header += [] if c["key"] in no_diff + OURS_ONLY else ["Δ"]
    header.append("n")
    body = []
    for row in rows:
        row_runs = by_row.get(row["id"], [])
        paper = papers[row["id"]]
        cells = []
        for c in columns:
            key = c["key"]
            if key in DESCRIPTIVE:
                value = paper.get(key) if key == "structured" else row.get(key)
                cells.append(fmt_plain(value) if key != "pattern" or value else "-")
                continue
            cell, style = cells_of[row["id"], key], styles[key]
            cells.append(fmt_cell(cell, key, spread, len(row_runs), style))
            if key in OURS_ONLY:
                continue
            theirs = paper.get("flops_train" if key.startswith("flops_train") else key)
            cells.append(fmt_paper(theirs, style))
            if key not in no_diff:
                cells.append(fmt(cell.mean - theirs, style, signed=True) if cell.mean is not None and theirs is not None
                             else "")
        total = found.get(row["id"], 0)
        cells.append(f"{len(row_runs)}/{total}" if total else ("" if row.get("preset") or scale == "small" else "paper only"))
        body.append(cells)

    what = "full scale" if scale == "full" else "small scale (digits, CPU)"
    footnote = notes(table_id, spread, best, columns)
    if scale == "small":
        footnote += (" Small scale: accuracy on digits (detection: the generated shapes set) beside the paper's "
                     "ImageNet/COCO figure, without a difference: only the layout is comparable.")
    lines = [f"### {spec['title']}: {what}", "", markdown(header, body), "", footnote]
    if sources:
        lines += ["", "Runs:"] + [f"- {k}: " + ", ".join(str(r.path) for r in v) for k, v in by_row.items()]
    return "\n".join(lines)


def other_scales_hint(rows: Sequence[dict[str, Any]], scale: str, table_id: str | None = None) -> str:
    """``; 30 small-scale runs exist: add --scale small`` when the runs' ``row.json`` (``rows``; of
    ``table_id`` if given) are at other scales than ``scale`` (a forgotten ``--scale small``), else ``""``."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("table") and (table_id is None or row["table"] == table_id) and scale_of(row) != scale:
            counts[scale_of(row)] = counts.get(scale_of(row), 0) + 1
    return "".join(f"; {n} {s}-scale run{'s exist' if n != 1 else ' exists'}: add --scale {s}"
                   for s, n in sorted(counts.items()))


def notes(table_id: str, spread: str, best: bool, columns: Sequence[dict[str, Any]]) -> str:
    """The footnote under a table: what the numbers are."""
    keys = {c["key"] for c in columns}
    text = [f"Ours: mean {'± sample std' if spread == 'std' else '[min, max]'} over the seeds of a row; "
            "n = finished runs / run directories found (a cell fed by fewer runs says so). "
            "Δ = ours − paper. Blank: no finished run (or the paper has no such row)."]
    if "top1" in keys:
        text.append("Top-1 = the last evaluation (final epoch)" + ("; Best = the best epoch's." if best else "."))
    if "flops_train" in keys:
        text.append("FLOPs (Train) = the logged `train_flops_ratio` (the run's training FLOPs over a dense run of "
                    "the same length) × run epochs / the dense row's epochs, so that ASP's 200-epoch run is counted "
                    "against the 120-epoch dense baseline as the paper's 1.24× is; rows as long as the dense row "
                    "are unchanged.")
    if keys & {"bbox_map", "segm_map"}:
        text.append("mAP = mmdet's `coco/bbox_mAP` (`coco/segm_mAP`) × 100 at the last validation.")
    if "params_test" in keys:
        text.append("Params/FLOPs (Test): `lbc.summary.summarize` (as `lbc-summary`) on the run's model and "
                    "pattern: Conv/Linear weights and biases at N/M density, MACs of one image at the data's "
                    "input size. Sparsity = 100 × (1 − logged density) over all Conv/Linear weights (stem and "
                    "classifier stay dense).")
    if table_id == "table5":
        text.append("LBC (0, 0) runs `sparsity.removal=released`.")
    return " ".join(text)


def load_paper(path: Path = PAPER_TABLES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())["tables"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and print the tables; the exit status (2: bad arguments)."""
    paper = load_paper()
    parser = argparse.ArgumentParser(prog="collect_results.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_root", type=Path, help="folder holding the run directories (searched recursively)")
    parser.add_argument("--table", nargs="+", choices=sorted(paper), help="tables to print (default: every table "
                        "with a run at this scale; at full scale every table)")
    parser.add_argument("--scale", choices=SCALES, default="full")
    parser.add_argument("--spread", choices=("std", "minmax"), default="std",
                        help="spread over seeds: sample standard deviation, or [min, max]")
    parser.add_argument("--best", action="store_true", help="also show the best epoch's top-1")
    parser.add_argument("--sources", action="store_true", help="list the run directories under each table")
    parser.add_argument("--out", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    if not args.run_root.is_dir():
        print(f"error: {args.run_root} is not a directory", file=sys.stderr)
        return 2

    def warn(line: str) -> None:
        print(line, file=sys.stderr)

    runs, bad = load_runs(args.run_root, warn=warn)
    rows = [r.row for r in runs] + [b[1] for b in bad]
    tables = args.table or [t for t in paper if args.scale == "full"
                            or any(r.get("table") == t and scale_of(r) == args.scale for r in rows)]
    if not tables:
        print(f"no {args.scale}-scale run under {args.run_root}{other_scales_hint(rows, args.scale)}", file=sys.stderr)
        return 1
    summaries: dict[Any, Any] = {}
    parts = []
    for t in tables:
        parts.append(render_table(t, paper[t], runs, bad, args.scale, args.spread, args.best, args.sources,
                                  summaries, root=args.run_root, warn=warn))
        if not any(r.get("table") == t and scale_of(r) == args.scale for r in rows):
            hint = other_scales_hint(rows, args.scale, t)
            if hint:
                warn(f"no {args.scale}-scale runs of {t} under {args.run_root}{hint}")
    text = "\n\n".join(parts) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

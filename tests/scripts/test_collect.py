"""scripts/collect_results.py: tables from run directories in the trainer's real format (one real
tiny run, copied into seeds with chosen values), blanks for missing runs, one line per broken run,
mean and spread over seeds, ASP's FLOPs normalised by the dense row's epochs, detection mAP, and
Table 4's Params/FLOPs (Test) from lbc.summary."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT, TINY, run_cli

SCRIPT = ROOT / "scripts" / "collect_results.py"


def load_script(name: str, path: Path) -> Any:
    """A script under scripts/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


collect = load_script("collect_results", SCRIPT)
PAPER = collect.load_paper()


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-epoch LBC run of the trainer (a few steps on digits; seconds)."""
    run_dir = tmp_path_factory.mktemp("real") / "run"
    code, _, err = run_cli(*TINY, "sparsity=lbc", "sparsity.t_f=1", f"run_dir={run_dir}")
    assert code == 0, err
    return run_dir


def write_run(root: Path, table: str, scale: str, row: str, seed: int, template: Path, *,
              method: str = "lbc", pattern: str | None = "2:4", paper_row: str | None = None,
              final: dict[str, Any] | None = None, epochs: int | None = None,
              records: list[dict[str, Any]] | None = None) -> Path:
    """A run directory as the launcher and trainer leave it: row.json, config.yaml and metrics.jsonl
    copied from the real run ``template``, with the last record's values replaced by ``final`` and
    the schedule stretched to ``epochs`` (the last record's epoch follows)."""
    path = root / table / scale / row / f"seed{seed}"
    path.mkdir(parents=True)
    config = yaml.safe_load((template / "config.yaml").read_text())
    config["sparsity"]["method"] = method
    if pattern:
        config["sparsity"]["pattern"] = pattern
    if records is None:
        records = [json.loads(ln) for ln in (template / "metrics.jsonl").read_text().splitlines()]
    if epochs is not None:
        config["schedule"]["epochs"] = epochs
        records[-1]["epoch"] = epochs
    records[-1].update(final or {})
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row_json = {"table": table, "row": row, "preset": None if scale == "small" else f"{table}/{row}", "scale": scale,
                "seed": seed, "overrides": [], "method": method, "pattern": pattern, "paper_row": paper_row}
    (path / "row.json").write_text(json.dumps(row_json))
    return path


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``markdown``, as cells."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


def header(markdown: str) -> list[str]:
    return [c.strip() for c in next(ln for ln in markdown.splitlines() if ln.startswith("|")).strip("|").split(" | ")]


def cell(markdown: str, row_index: int, column: str, nth: int = 0) -> str:
    """The cell of body row ``row_index`` under the ``nth`` header named ``column``."""
    names = header(markdown)
    at = [i for i, name in enumerate(names) if name == column][nth]
    return table_rows(markdown)[row_index][at]


def small_index(table: str, row: str) -> int:
    """The body row of small-scale ``row`` (the table shows the small list's rows in its order)."""
    return [r["id"] for r in PAPER[table]["small"]].index(row)


def render(root: Path, table: str, scale: str, **kw: Any) -> str:
    runs, bad = collect.load_runs(root)
    return collect.render_table(table, PAPER[table], runs, bad, scale, **kw)


def test_real_run_format_is_what_the_collector_reads(real_run: Path, tmp_path: Path) -> None:
    records = [json.loads(ln) for ln in (real_run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    # the keys the collector and the plots read, as the trainer writes them
    assert {"epoch", "step", "top1", "sparsity/density", "sparsity/train_flops_ratio",
            "sparsity/alive_per_group"} <= last.keys()
    path = write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run, paper_row="resnet50_lbc_2x4")
    run = collect.read_run(path)
    assert run.epochs == last["epoch"] == 2
    assert run.final == last  # the record as written: one schema for every task, no renaming
    text = render(tmp_path, "table1", "small")
    i = small_index("table1", "lbc_2x4")  # the small table's every row shows, ours among them
    assert cell(text, i, "Top-1 Accuracy (%) ours") == f"{last['top1']:.2f}"
    assert cell(text, i, "paper") == "77.2"  # resnet50_lbc_2x4's
    # small scale: digits top-1 beside ImageNet's for the layout, never subtracted; FLOPs ratios are
    names = header(text)
    assert names[names.index("Top-1 Accuracy (%) ours") + 2] != "Δ" and names.count("Δ") == 1
    assert names[names.index("FLOPs (Train) ours") + 2] == "Δ"
    # no dense run at small scale: the figure is the run's own, not divided by the paper's 120 epochs
    assert cell(text, i, "FLOPs (Train) ours") == f"{last['sparsity/train_flops_ratio']:.2f}×"
    assert cell(text, i, "n") == "1/1"


def test_mean_and_spread_over_seeds(real_run: Path, tmp_path: Path) -> None:
    values = [61.0, 64.5, 70.25]
    for seed, v in enumerate(values):
        write_run(tmp_path, "table5", "small", "lbc_1x4_ti0_tf0", seed, real_run, pattern="1:4",
                  paper_row="resnet50_lbc_1x4_ti0_tf0", final={"top1": v})
    mean, std = statistics.fmean(values), statistics.stdev(values)
    text = render(tmp_path, "table5", "small")
    i = small_index("table5", "lbc_1x4_ti0_tf0")
    assert cell(text, i, "Top-1 Accuracy (%) ours") == f"{mean:.2f} ± {std:.2f}"
    assert cell(text, i, "n") == "3/3"
    ranged = render(tmp_path, "table5", "small", spread="minmax")
    assert cell(ranged, i, "Top-1 Accuracy (%) ours") == f"{mean:.2f} [61.00, 70.25]"
    assert "sample std" in text and "[min, max]" in ranged


def test_best_top1_is_the_best_epoch(real_run: Path, tmp_path: Path) -> None:
    records = [json.loads(ln) for ln in (real_run / "metrics.jsonl").read_text().splitlines()]
    records[0]["top1"] = 99.0
    write_run(tmp_path, "table6", "small", "lbc_2x4_score", 0, real_run, records=records, final={"top1": 50.0})
    text = render(tmp_path, "table6", "small", best=True)
    i = small_index("table6", "lbc_2x4_score")
    assert cell(text, i, "Top-1 Accuracy (%) ours") == "50.00"
    assert cell(text, i, "Best Top-1 (%) ours") == "99.00"


def test_missing_runs_are_blank_not_zero(real_run: Path, tmp_path: Path) -> None:
    write_run(tmp_path, "table1", "full", "resnet50_lbc_2x4", 0, real_run, final={"top1": 76.0})
    text = render(tmp_path, "table1", "full")
    rows = table_rows(text)
    ids = [r["id"] for r in PAPER["table1"]["rows"]]
    assert len(rows) == len(ids)
    ours = ids.index("resnet50_lbc_2x4")
    assert cell(text, ours, "Top-1 Accuracy (%) ours") == "76.00"
    assert cell(text, ours, "Δ") == f"{76.0 - 77.2:+.2f}"  # full scale: the same data set, subtracted
    for i, row_id in enumerate(ids):
        if i != ours:
            assert cell(text, i, "Top-1 Accuracy (%) ours") == "" and cell(text, i, "Δ") == "", row_id
            assert cell(text, i, "FLOPs (Train) ours") == "" and cell(text, i, "n") == "", row_id
    assert cell(text, ids.index("resnet18_dense"), "paper") == "70.9"  # the paper's value still shows
    t4 = render(tmp_path, "table4", "full")
    t4_ids = [r["id"] for r in PAPER["table4"]["rows"]]
    assert cell(t4, t4_ids.index("rigl"), "n") == "paper only" and cell(t4, t4_ids.index("rigl"), "paper") == "70.0"


def test_broken_and_unfinished_runs_are_one_line_each(real_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run, final={"top1": 55.0})
    garbled = write_run(tmp_path, "table1", "small", "lbc_2x4", 1, real_run)
    (garbled / "metrics.jsonl").write_text('{"epoch": 1, "top1": 3.0}\n{"epoch": 2, "to')  # killed mid-write
    unfinished = write_run(tmp_path, "table1", "small", "lbc_2x4", 2, real_run, epochs=120)
    unfinished.joinpath("metrics.jsonl").write_text((real_run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    not_started = tmp_path / "table1" / "small" / "srste_1x16" / "seed0"
    not_started.mkdir(parents=True)
    (not_started / "row.json").write_text(json.dumps({"table": "table1", "row": "srste_1x16", "scale": "small",
                                                      "seed": 0, "method": "srste", "pattern": "1:16"}))
    bad_row = write_run(tmp_path, "table1", "small", "lbc_1x8", 0, real_run)
    (bad_row / "row.json").write_text("{not json")

    assert collect.main([str(tmp_path), "--scale", "small"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("skipped ")]
    assert len(lines) == 4
    for path, reason in ((garbled, "line 2 is not JSON"), (unfinished, "unfinished (1/120 epochs)"),
                         (not_started, "not started"), (bad_row, "row.json unreadable")):
        assert sum(str(path) in ln and reason in ln for ln in lines) == 1, (path, lines)
    # an unfinished run's line says how to continue it (the launcher resumes from last.pt)
    again = f"(continue: bash scripts/table1.sh --scale small --rows lbc_2x4 --seeds 2 --out {tmp_path})"
    assert sum(ln.endswith(again) for ln in lines) == 1
    # the other rows of small Table 1 have no run: one line each; lbc_1x8's directory is there, unreadable
    missing = [ln for ln in err.strip().splitlines() if not ln.startswith("skipped ")]
    expected = {r["id"] for r in PAPER["table1"]["small"]} - {"lbc_2x4", "srste_1x16"}
    assert sorted(ln.split(":")[0] for ln in missing) == sorted(f"table1 {r}" for r in expected)
    assert any(ln.startswith("table1 lbc_1x8: no readable run under") for ln in missing)
    rows = {r[1] + " " + r[2]: r for r in table_rows(out)}
    assert rows["LBC 2:4"][3] == "55.00" and rows["LBC 2:4"][-1] == "1/3"  # only the good run feeds the cell
    assert rows["SR-STE 1:16"][3] == "" and rows["SR-STE 1:16"][-1] == "0/1"
    assert good.is_dir()


def test_asp_flops_normalised_by_the_dense_rows_epochs(real_run: Path, tmp_path: Path) -> None:
    dense_ratio, asp_ratio = 1.0, 0.744
    write_run(tmp_path, "table1", "full", "resnet50_dense", 0, real_run, method="dense", pattern=None, epochs=120,
              final={"sparsity/train_flops_ratio": dense_ratio})
    write_run(tmp_path, "table1", "full", "resnet50_asp_2x4", 0, real_run, method="asp", epochs=200,
              final={"sparsity/train_flops_ratio": asp_ratio})
    write_run(tmp_path, "table1", "full", "resnet50_lbc_2x4", 0, real_run, epochs=120,
              final={"sparsity/train_flops_ratio": 0.6})
    ids = [r["id"] for r in PAPER["table1"]["rows"]]
    text = render(tmp_path, "table1", "full")
    asp = ids.index("resnet50_asp_2x4")
    assert cell(text, asp, "FLOPs (Train) ours") == f"{asp_ratio * 200 / 120:.2f}×" == "1.24×"
    assert cell(text, asp, "Epochs (Train) ours") == "200" and cell(text, asp, "paper", nth=1) == "200"
    assert cell(text, ids.index("resnet50_lbc_2x4"), "FLOPs (Train) ours") == "0.60×"  # same length: unchanged
    assert cell(text, ids.index("resnet50_dense"), "FLOPs (Train) ours") == "1.00×"
    assert "120-epoch dense baseline" in text
    # no dense run of ours: the paper's dense row (120 epochs) is the reference
    only_asp = tmp_path / "only_asp"
    write_run(only_asp, "table1", "full", "resnet50_asp_2x4", 0, real_run, method="asp", epochs=200,
              final={"sparsity/train_flops_ratio": asp_ratio})
    assert cell(render(only_asp, "table1", "full"), asp, "FLOPs (Train) ours") == "1.24×"


def test_detection_map_in_percent(real_run: Path, tmp_path: Path) -> None:
    records = [{"epoch": 1, "step": 10, "coco/bbox_mAP": 0.1, "coco/segm_mAP": 0.05, "sparsity/density": 1.0},
               {"epoch": 2, "step": 20, "coco/bbox_mAP": 0.385, "coco/segm_mAP": 0.3525, "sparsity/density": 0.55}]
    write_run(tmp_path, "table3", "full", "mask_rcnn_r50_fpn_lbc_2x4", 0, real_run, records=records)
    text = render(tmp_path, "table3", "full")
    i = [r["id"] for r in PAPER["table3"]["rows"]].index("mask_rcnn_r50_fpn_lbc_2x4")
    assert cell(text, i, "Box mAP ours") == "38.5" and cell(text, i, "Δ") == "-0.8"
    assert cell(text, i, "Mask mAP ours") == "35.2" and cell(text, i, "paper", nth=1) == "35.4"


def test_table4_params_and_flops_from_lbc_summary(real_run: Path, tmp_path: Path) -> None:
    from lbc.models import build_model
    from lbc.summary import summarize

    write_run(tmp_path, "table4", "small", "lbc_1x16", 0, real_run, pattern="1:16", paper_row="resnet50_lbc_1x16",
              final={"sparsity/density": 0.1})
    config = yaml.safe_load((real_run / "config.yaml").read_text())
    model = build_model(num_classes=config["data"]["num_classes"], **config["model"])
    totals = summarize(model, "1:16", tuple(config["data"]["input_size"]))["totals"]
    text = render(tmp_path, "table4", "small")
    small = [r["id"] for r in PAPER["table4"]["small"]]
    i = small.index("lbc_1x16")
    # the small model's sizes print in units that show them (K params, MFLOPs), named in the header;
    # the paper's values beside them are converted to the same unit
    params, flops = totals["params_nonzero"], totals["flops_sparse"]
    assert params < 1e5 and flops < 1e8  # else the test would not test the unit change
    assert cell(text, i, "Params (Test) [K] ours") == f"{params / 1e3:.{2 - int(math.log10(params / 1e3))}f}K"
    assert cell(text, i, "FLOPs (Test) [M] ours") == f"{flops / 1e6:.{2 - int(math.log10(flops / 1e6))}f}M"
    assert cell(text, i, "paper", nth=2) == "3520K" and cell(text, i, "paper", nth=3) == "440M"
    assert cell(text, i, "Sparsity (%) ours") == "90.0" and cell(text, i, "paper", nth=1) == "94"
    assert cell(text, small.index("dense"), "paper", nth=3) == "4100M"
    assert totals["params_nonzero"] < totals["params_total"]


@pytest.mark.parametrize(("values", "unit", "shown"), [
    ([0.0069, 0.0012], "M", ["6.90M", "1.20M"]),  # the small model: 0.001G before
    ([4.1, 0.37], "G", ["4.100G", "0.370G"]),  # full scale stays in the paper's unit
    ([0.00004], "K", ["40.0K"]),
])
def test_flops_unit_shows_nonzero_digits(values: list[float], unit: str, shown: list[str]) -> None:
    style = collect.column_style("flops_test", values)
    assert style.unit == unit and [collect.fmt(v, style) for v in values] == shown
    assert collect.column_header("FLOPs (Test) [G]", "flops_test", style) == f"FLOPs (Test) [{unit}]"
    assert collect.fmt_paper(0.44, style) == {"G": "0.44G", "M": "440M", "K": "440000K"}[unit]


def test_missing_rows_are_one_line_each_with_the_command(real_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert collect.main([str(tmp_path), "--scale", "small", "--table", "table6"]) == 0
    out, err = capsys.readouterr()
    small = [r["id"] for r in PAPER["table6"]["small"]]
    # a table without runs: its rows, blank, in the paper's order (not just a header) ...
    assert [r[0] for r in table_rows(out)] == ["Baseline", "Magnitude", "Gradient", "S-inverse", "S (LBC)"]
    assert all(cell(out, i, "Top-1 Accuracy (%) ours") == "" for i in range(len(small)))
    # ... and one line per row on stderr (not per cell), saying what to run
    assert err.splitlines() == [f"table6 {r}: no run under {tmp_path / 'table6' / 'small' / r} "
                                f"(run: bash scripts/table6.sh --scale small --rows {r} --out {tmp_path})" for r in small]
    write_run(tmp_path, "table6", "small", "lbc_2x4_score", 0, real_run)
    assert collect.main([str(tmp_path), "--scale", "small", "--table", "table6"]) == 0
    err = capsys.readouterr().err
    assert len(err.splitlines()) == len(small) - 1 and "lbc_2x4_score:" not in err
    # full scale: rows the paper has but this repository does not implement (no preset) have nothing to run
    assert collect.main([str(tmp_path), "--table", "table4"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[0] for ln in err if not ln.startswith("no ")] == [
        f"table4 {r['id']}" for r in PAPER["table4"]["rows"] if r["preset"]]
    assert f"(run: bash scripts/table4.sh --rows resnet50_lbc_1x16 --out {tmp_path})" in err[-1]


def test_wrong_scale_is_one_hint(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in range(2):
        write_run(tmp_path, "table1", "small", "lbc_2x4", seed, real_run)
    assert collect.main([str(tmp_path), "--table", "table1", "table5"]) == 0  # forgot --scale small
    err = capsys.readouterr().err.splitlines()
    hint = f"no full-scale runs of table1 under {tmp_path}; 2 small-scale runs exist: add --scale small"
    assert err.count(hint) == 1 and err[-1] != hint  # after table1's rows, not for table5 (no run anywhere)
    assert not any(ln.startswith("no ") and "table5" in ln for ln in err)
    assert collect.main([str(tmp_path), "--table", "table1", "--scale", "small"]) == 0  # the right scale: no hint
    assert not any("add --scale" in ln for ln in capsys.readouterr().err.splitlines())
    only_full = tmp_path / "full"
    write_run(only_full, "table1", "full", "resnet50_lbc_2x4", 0, real_run)
    assert collect.main([str(only_full), "--scale", "small"]) == 1  # no table at this scale: one line
    assert capsys.readouterr().err == (f"no small-scale run under {only_full}; "
                                       "1 full-scale run exists: add --scale full\n")


def test_small_rows_without_a_paper_row_have_blank_paper_cells(real_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path, "table1", "small", "srste_1x8", 0, real_run, method="srste", pattern="1:8", paper_row=None,
              final={"top1": 40.0})
    write_run(tmp_path, "table1", "small", "dense", 0, real_run, method="dense", pattern=None,
              paper_row="resnet50_dense", final={"top1": 90.0})
    out_file = tmp_path / "out" / "tables.md"
    assert collect.main([str(tmp_path), "--scale", "small", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert out_file.read_text() == out
    assert out.count("### ") == 1  # only the table that has small-scale runs
    small = [r["id"] for r in PAPER["table1"]["small"]]
    assert len(table_rows(out)) == len(small)  # every row of the small table, in its (the paper's) order
    assert [r[1] for r in table_rows(out)][:2] == ["Baseline", "ASP"]
    i = small.index("srste_1x8")
    assert table_rows(out)[i][1:3] == ["SR-STE", "1:8"]
    assert cell(out, i, "Top-1 Accuracy (%) ours") == "40.00" and cell(out, i, "paper") == ""
    assert cell(out, 0, "Top-1 Accuracy (%) ours") == "90.00" and cell(out, 0, "paper") == "77.1"
    assert cell(out, small.index("lbc_1x16"), "Top-1 Accuracy (%) ours") == ""  # no run: blank
    assert cell(out, small.index("lbc_1x16"), "paper") == "71.8"


def test_paper_tables_file_is_complete() -> None:
    counts = {t: len(PAPER[t]["rows"]) for t in PAPER}
    assert counts == {"table1": 17, "table2": 5, "table3": 5, "table4": 7, "table5": 8, "table6": 5}
    for table, spec in PAPER.items():
        keys = {c["key"] for c in spec["columns"]}
        for row in spec["rows"]:
            assert row["preset"] in (None, f"{table}/{row['id']}")
            assert keys - set(collect.DESCRIPTIVE) <= row["paper"].keys(), (table, row["id"])
            assert all(isinstance(v, (int, float)) for k, v in row["paper"].items() if k != "structured")
    assert [r["id"] for r in PAPER["table4"]["rows"] if r["preset"] is None] == ["dnw", "rigl", "gmp", "str"]


def test_bad_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert collect.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert collect.main([str(tmp_path), "--scale", "small"]) == 1  # no small-scale run: says so

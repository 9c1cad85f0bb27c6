"""scripts/plot_runs.py: PNGs from run directories in the trainer's format (copied from one real tiny
run): valid PNG files, one line per row (the mean of its seeds, with a min-max band) in every panel,
values from the runs' metrics, integer epoch ticks, titles from row.json, coinciding rows visible,
FLOPs normalised as the collector does, unreadable runs one line each."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.lines import Line2D

from tests.helpers import ROOT
from tests.scripts.test_collect import load_script, real_run, write_run  # noqa: F401  (real_run: the fixture)

plot = load_script("plot_runs", ROOT / "scripts" / "plot_runs.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def records_of(template: Path, top1: list[float], alive: bool = True) -> list[dict]:
    """The real run's records, one per epoch of ``top1``, with those top-1 values (and without LBC's
    alive count for other methods)."""
    real = [json.loads(ln) for ln in (template / "metrics.jsonl").read_text().splitlines()]
    out = []
    for epoch, value in enumerate(top1, 1):
        record = dict(real[min(epoch, len(real)) - 1], epoch=epoch, top1=value)
        if not alive:
            record = {k: v for k, v in record.items() if "alive" not in k and "removed" not in k}
        out.append(record)
    return out


@pytest.fixture
def runs_root(real_run: Path, tmp_path: Path) -> Path:  # noqa: F811
    """5 runs: LBC 2:4 with 3 seeds, SR-STE 1:8 and ASP 2:4 (200 epochs) with one, dense (120 epochs)."""
    root = tmp_path / "runs"
    for seed in range(3):
        write_run(root, "table1", "small", "lbc_2x4", seed, real_run, epochs=3,
                  records=records_of(real_run, [10.0, 40.0 + seed, 60.0 + seed]))
    write_run(root, "table1", "small", "srste_1x8", 0, real_run, method="srste", pattern="1:8", epochs=3,
              records=records_of(real_run, [12.0, 30.0, 50.0], alive=False))
    write_run(root, "table1", "small", "asp_2x4", 0, real_run, method="asp", epochs=200,
              records=records_of(real_run, [20.0, 70.0], alive=False), final={"sparsity/train_flops_ratio": 0.9})
    write_run(root, "table1", "small", "dense", 0, real_run, method="dense", pattern=None, epochs=120,
              records=records_of(real_run, [30.0, 80.0], alive=False), final={"sparsity/train_flops_ratio": 1.0})
    return root


def lines(ax) -> list[Line2D]:
    """The axes' data lines (not unlabelled guides such as ASP's prune marker)."""
    return [ln for ln in ax.get_lines() if isinstance(ln, Line2D) and not ln.get_label().startswith("_")]


def bands(ax) -> list[PolyCollection]:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_one_line_per_row_mean_of_its_seeds_with_a_band(runs_root: Path) -> None:
    runs = plot.load([runs_root])
    assert len(runs) == 6
    figs = plot.figures(runs)
    assert set(figs) == {"top1", "sparsity", "flops_top1"}
    density_ax, alive_ax = figs["sparsity"].axes
    (flops_ax,) = figs["flops_top1"].axes
    # 4 rows (LBC 2:4 has 3 seeds): one line each, not one per run
    assert len(lines(density_ax)) == len(flops_ax.containers) == 4
    assert [ln.get_label() for ln in lines(density_ax)] == ["Baseline (dense)", "ASP 2:4", "LBC 2:4", "SR-STE 1:8"]
    assert legend_texts(figs["sparsity"]) == ["Baseline (dense)", "ASP 2:4", "LBC 2:4", "SR-STE 1:8"]
    assert len(lines(alive_ax)) == 1  # only LBC logs alive candidates
    assert len(bands(density_ax)) == 1  # the only row of several seeds has the only band
    # top-1: a column per setting (pattern), all epochs above and the last ones zoomed below, the dense
    # row in each as a reference; every other row once
    top_24, top_18, zoom_24, zoom_18 = figs["top1"].axes
    assert [top_24.get_title(), top_18.get_title()] == ["2:4", "1:8"]
    for top, zoom, labels in ((top_24, zoom_24, ["Baseline (dense)", "ASP", "LBC"]),
                              (top_18, zoom_18, ["Baseline (dense)", "SR-STE"])):
        assert sorted(ln.get_label() for ln in lines(top)) == sorted(ln.get_label() for ln in lines(zoom)) == sorted(labels)
    assert legend_texts(figs["top1"]) == ["Baseline (dense)", "ASP", "LBC", "SR-STE"]
    # the seeds' mean, and their min-max band
    lbc = next(ln for ln in lines(top_24) if ln.get_label() == "LBC")
    assert list(lbc.get_xdata()) == [1, 2, 3] and list(lbc.get_ydata()) == [10.0, 41.0, 61.0]
    (band,) = bands(top_24)
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == 10.0 and max(ys) == 62.0 and 40.0 in ys and 60.0 in ys
    assert bands(top_18) == []
    srste = next(ln for ln in lines(top_18) if ln.get_label() == "SR-STE")
    assert list(srste.get_xdata()) == [1, 2, 3] and list(srste.get_ydata()) == [12.0, 30.0, 50.0]
    assert len({ln.get_color() for ln in lines(top_24)}) == 3  # methods told apart by colour in a panel
    # the caption says what line and band are; the title names the table, scale and patterns (row.json)
    captions = " ".join(t.get_text() for t in figs["top1"].texts)
    assert "line: mean of each row's 1-3 seeds, band: min-max" in captions
    title = figs["top1"]._suptitle.get_text()
    assert title.startswith("Table 1 (small scale)") and "top-1" in title
    assert "N:M 2:4 / 1:8 and dense" in title


def test_integer_epochs_get_integer_ticks(runs_root: Path) -> None:
    runs = [r for r in plot.load([runs_root]) if r.epochs == 3]  # epochs 1-3: matplotlib's default puts 1.5, 2.5
    figs = plot.figures(runs)
    for ax in figs["top1"].axes + figs["sparsity"].axes:
        ticks = ax.xaxis.get_majorticklocs()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_same_schedule_rows_share_a_colour_and_differ_in_style(real_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """Table 5: SR-STE and LBC at one (t_i, t_f) have the same density curve; both stay visible."""
    root = tmp_path / "runs"
    for method in ("srste", "lbc"):
        for t_f, paper_tf in ((3, 30), (6, 60)):
            row = f"{method}_1x4_ti0_tf{paper_tf}"
            path = write_run(root, "table5", "small", row, 0, real_run, method=method, pattern="1:4", epochs=12,
                             paper_row=f"resnet50_{row}", records=records_of(real_run, [50.0, 60.0, 70.0]))
            config = yaml.safe_load((path / "config.yaml").read_text())
            config["sparsity"].update(t_i=0, t_f=t_f)
            (path / "config.yaml").write_text(yaml.safe_dump(config))
    figs = plot.figures(plot.load([root]))
    density_ax = figs["sparsity"].axes[0]
    by_label = {ln.get_label(): ln for ln in lines(density_ax)}
    # relabelled in the runs' own epochs, the caption relates them to the paper's 120-epoch rows
    assert set(by_label) == {"SR-STE 1:4 (0, 3)", "LBC 1:4 (0, 3)", "SR-STE 1:4 (0, 6)", "LBC 1:4 (0, 6)"}
    caption = " ".join(t.get_text() for t in figs["sparsity"].texts)
    assert "(t_i, t_f) in epochs of these 12-epoch runs" in caption and "(0, 30) of 120 epochs is (0, 3)" in caption
    title = figs["sparsity"]._suptitle.get_text()
    assert title.startswith("Table 5 (small scale)") and "N:M 1:4" in title
    srste, lbc = by_label["SR-STE 1:4 (0, 3)"], by_label["LBC 1:4 (0, 3)"]
    assert list(srste.get_ydata()) == list(lbc.get_ydata())  # the same curve ...
    assert srste.get_color() == lbc.get_color() != by_label["LBC 1:4 (0, 6)"].get_color()
    # ... drawn so that both show: a wide translucent line under a thin one with markers
    assert srste.get_linewidth() >= 3 * lbc.get_linewidth() and srste.get_alpha() < 1
    assert lbc.get_marker() not in (None, "None", "") and srste.get_marker() in (None, "None", "")
    assert lbc.get_zorder() > srste.get_zorder()  # the thin line on top
    # top-1: one panel per schedule, titled in the runs' epochs
    titles = [ax.get_title() for ax in figs["top1"].axes[:2]]
    assert titles == ["1:4, (t_i, t_f) = (0, 3)", "1:4, (t_i, t_f) = (0, 6)"]


def test_flops_axis_normalised_like_the_collector(runs_root: Path) -> None:
    figs = plot.figures(plot.load([runs_root]))
    (ax,) = figs["flops_top1"].axes
    assert len(ax.get_lines()) == len(ax.containers) == 4  # one marker per row (no cap lines)
    points = {c.get_label(): (float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0]))
              for c in ax.containers}
    assert points["ASP 2:4"] == (pytest.approx(0.9 * 200 / 120), 70.0)  # ASP over the dense row's 120 epochs
    assert points["Baseline (dense)"] == (1.0, 80.0)
    assert points["LBC 2:4"][1] == 61.0  # one marker per row: the seeds' mean, with a min-max bar
    bars = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert any(sorted(seg[:, 1]) == [60.0, 62.0] for seg in bars)


def test_main_writes_valid_pngs(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = runs_root / "table1" / "small" / "lbc_2x4" / "seed9"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text("{oops\n")
    out = tmp_path / "figs"
    assert plot.main([str(runs_root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"skipped {broken}: metrics.jsonl line 1 is not JSON"]
    for name in ("top1", "sparsity", "flops_top1"):
        path = out / f"{name}.png"
        assert str(path) in captured.out
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_no_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable run" in err and not (tmp_path / "f").exists()


def test_equal_seeds_plot_a_point_without_a_bar(real_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """Three seeds at 98.61111111111111 average to a hair above it (float rounding): still one point."""
    value = 98.61111111111111
    for seed in range(3):
        write_run(tmp_path, "table1", "small", "lbc_1x16", seed, real_run, pattern="1:16",
                  records=records_of(real_run, [50.0, value]))
    (ax,) = plot.figures(plot.load([tmp_path]))["flops_top1"].axes
    (container,) = ax.containers
    assert float(container.lines[0].get_ydata()[0]) == pytest.approx(value)
    (segment,) = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert segment[:, 1].max() - segment[:, 1].min() == pytest.approx(0.0)

"""scripts/plot_runs.py: PNGs from run directories in the trainer's format (copied from one real tiny
run): valid PNG files, one line per run in every panel, values from the runs' metrics, FLOPs normalised
as the collector does, unreadable runs one line each."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
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
    return [ln for ln in ax.get_lines() if isinstance(ln, Line2D)]


def test_one_line_per_run_in_every_panel(runs_root: Path) -> None:
    runs = plot.load([runs_root])
    assert len(runs) == 6
    figs = plot.figures(runs)
    assert set(figs) == {"top1", "sparsity", "flops_top1"}
    (top1_ax,) = figs["top1"].axes
    density_ax, alive_ax = figs["sparsity"].axes
    (flops_ax,) = figs["flops_top1"].axes
    assert len(lines(top1_ax)) == len(lines(density_ax)) == len(lines(flops_ax)) == 6
    assert len(lines(alive_ax)) == 3  # only the LBC runs log alive candidates
    # the legend names each row once (seeds share it), and says how many seeds are drawn
    labels = [t.get_text() for t in top1_ax.get_legend().get_texts()]
    assert sorted(labels) == ["asp_2x4", "dense", "lbc_2x4 (3 seeds)", "srste_1x8"]
    # the curves are the runs' values, epoch by epoch
    srste = next(ln for ln in lines(top1_ax) if ln.get_label() == "srste_1x8")
    assert list(srste.get_xdata()) == [1, 2, 3] and list(srste.get_ydata()) == [12.0, 30.0, 50.0]
    lbc_colours = {ln.get_color() for ln in lines(top1_ax) if max(ln.get_ydata()) in (60.0, 61.0, 62.0)}
    assert len(lbc_colours) == 1  # seeds of a row share its colour


def test_flops_axis_normalised_like_the_collector(runs_root: Path) -> None:
    figs = plot.figures(plot.load([runs_root]))
    points = [(float(ln.get_xdata()[0]), float(ln.get_ydata()[0])) for ln in figs["flops_top1"].axes[0].get_lines()]
    assert (pytest.approx(0.9 * 200 / 120), 70.0) in points  # ASP over the dense row's 120 epochs
    assert (1.0, 80.0) in points


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

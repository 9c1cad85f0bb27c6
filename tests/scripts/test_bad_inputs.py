"""Bad inputs to the reproduction scripts, one table per surface (the style of tests/cli/test_bad_values.py):
each row asserts the exit status and a single ``error:`` (or ``skipped``) line naming the culprit, and
that nothing was written or reported in its place.

- scripts/reproduce.py: seeds, --out, the torchrun environment and Hydra overrides, checked before
  anything runs in a real run and in --dry-run alike; a finished run of other settings is refused,
  never reported for the new command nor overwritten; a failed child's last error line is shown;
- scripts/plot_runs.py: --out at (or under) a file, unusable run directories;
- scripts/collect_results.py: a NaN, inf, null or string figure in the last record is a broken run
  (one stderr line naming the run dir and the value), never a blank cell counted as finished.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.scripts.test_collect import PAPER, collect, real_run, table_rows, write_run  # noqa: F401  (fixture)
from tests.scripts.test_plot import plot, records_of
from tests.scripts.test_reproduce import CLEAN_ENV, reproduce

# --- scripts/reproduce.py ------------------------------------------------------------------------------

SMALL_ONE = ["--table", "table1", "--scale", "small", "--rows", "lbc_2x4", "--seeds", "0"]
FULL_ONE = ["--table", "table1", "--rows", "resnet50_lbc_2x4", "data.root=/data/imagenet"]
TORCHRUN_VARS = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")

# (id, arguments, environment, what the one line names); "{file}" is a plain file in tmp_path.
REPRODUCE_CASES: list[tuple[str, list[str], dict[str, str], str]] = [
    ("seed -1", ["--table", "table1", "--seeds", "-1"], {}, "seed -1 is out of range"),
    ("seeds empty", ["--table", "table1", "--seeds", ""], {}, "--seeds is empty"),
    ("seeds 0,,1", ["--table", "table1", "--seeds", "0,,1"], {}, "--seeds 0,,1"),
    ("seeds 0,0", ["--table", "table1", "--seeds", "0,0"], {}, "names seed 0 more than once"),
    ("seeds 1,2,1", [*SMALL_ONE[:-1], "1,2,1"], {}, "names seed 1 more than once"),
    ("seed too big", ["--table", "table1", "--seeds", str(2**40)], {}, f"seed {2**40} is out of range"),
    ("NPROC abc", FULL_ONE, {"NPROC_PER_NODE": "abc"}, "NPROC_PER_NODE='abc'"),
    ("NPROC 0", FULL_ONE, {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0'"),
    ("NPROC -2", FULL_ONE, {"NPROC_PER_NODE": "-2"}, "NPROC_PER_NODE='-2'"),
    ("MASTER_PORT abc", FULL_ONE, {"NPROC_PER_NODE": "1", "MASTER_PORT": "abc"}, "MASTER_PORT='abc'"),
    ("MASTER_PORT 70000", FULL_ONE, {"NPROC_PER_NODE": "1", "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
    ("MASTER_PORT 0", FULL_ONE, {"NPROC_PER_NODE": "1", "MASTER_PORT": "0"}, "MASTER_PORT='0'"),
    ("NNODES 0", FULL_ONE, {"NPROC_PER_NODE": "1", "NNODES": "0"}, "NNODES='0'"),
    ("NNODES abc", FULL_ONE, {"NPROC_PER_NODE": "1", "NNODES": "abc"}, "NNODES='abc'"),
    ("NODE_RANK 2 of 2", FULL_ONE, {"NPROC_PER_NODE": "1", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"},
     "NODE_RANK='2'"),
    ("2 nodes no addr", FULL_ONE, {"NPROC_PER_NODE": "1", "NNODES": "2"}, "MASTER_ADDR"),
    ("slurm nodes abc", [*FULL_ONE, "--launcher", "slurm", "hydra.launcher.nodes=abc"], {}, "hydra.launcher.nodes='abc'"),
    ("override type", [*SMALL_ONE, "optim.lr=abc"], {}, "optim.lr='abc' is not allowed; use a number"),
    ("override range", [*SMALL_ONE, "optim.lr=-1"], {}, "optim.lr"),
    ("override key", [*SMALL_ONE, "optim.lrr=0.1"], {}, "optim.lrr"),
    ("override group", [*SMALL_ONE, "model=nope"], {}, "model=nope is not a known option"),
    ("override parse", [*SMALL_ONE, "optim.lr=["], {}, "optim.lr=[ cannot be parsed"),
    ("override epochs 0", [*SMALL_ONE, "schedule.epochs=0"], {}, "schedule.epochs"),
    ("override full", [*FULL_ONE, "trainer.amp=fp8"], {"NPROC_PER_NODE": "1"}, "trainer.amp"),
    ("every run", ["--table", "table1", "--scale", "small", "--rows", "lbc_*", "--seeds", "0,1", "optim.lr=abc"], {},
     "optim.lr='abc' is not allowed; use a number (every run of this command)"),
    ("no data.root", FULL_ONE[:-1], {"NPROC_PER_NODE": "1"}, "data.root is required"),
    ("out is a file", [*SMALL_ONE, "--out", "{file}"], {}, "--out {file}: is a file"),
    ("out under a file", [*SMALL_ONE, "--out", "{file}/runs"], {}, "{file} is a file, not a folder"),
    ("epochs 0", [*SMALL_ONE, "--epochs", "0"], {}, "--epochs 0"),
    ("epochs abc", [*SMALL_ONE, "--epochs", "abc"], {}, "argument --epochs: invalid int value: 'abc'"),
    ("unknown flag", [*SMALL_ONE, "--bogus"], {}, "unrecognized arguments: --bogus"),
    ("bad scale", ["--table", "table1", "--scale", "huge"], {}, "argument --scale: invalid choice: 'huge'"),
    ("no table", ["--seeds", "0"], {}, "the following arguments are required: --table"),
    ("override after a flag", [*SMALL_ONE, "optim.lr=0.1", "--epochs", "2", "optim.lrr=1"], {}, "optim.lrr"),
    ("max-steps -1", [*SMALL_ONE, "--max-steps", "-1"], {}, "--max-steps -1"),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SLURM or torchrun variable of the machine running the tests."""
    for key in list(os.environ):
        if key not in CLEAN_ENV:
            monkeypatch.delenv(key)
    return monkeypatch


def _paths(tmp_path: Path) -> tuple[Path, Path]:
    """(a plain file, the --out folder) in ``tmp_path``."""
    file = tmp_path / "notes.txt"
    file.write_text("a file, not a folder\n")
    return file, tmp_path / "runs"


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize(("args", "env", "culprit"), [c[1:] for c in REPRODUCE_CASES], ids=[c[0] for c in REPRODUCE_CASES])
def test_reproduce_bad_input_is_one_line_in_a_dry_run_and_a_real_one(
        tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        args: list[str], env: dict[str, str], culprit: str, dry: bool) -> None:
    file, out = _paths(tmp_path)
    for key, value in env.items():
        clean_env.setenv(key, value)
    argv = [a.replace("{file}", str(file)) for a in args]
    argv += [] if "--out" in argv else ["--out", str(out)]
    code = reproduce.main([*argv, *(["--dry-run"] if dry else [])])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.out + captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert culprit.replace("{file}", str(file)) in lines[0], lines[0]
    assert captured.out == ""  # no command printed, no run started
    assert not out.exists() and file.read_text() == "a file, not a folder\n"  # nothing written


def test_a_row_that_cannot_take_an_override_is_marked_in_the_dry_run(tmp_path: Path, clean_env, capsys) -> None:
    """sparsity.lambda_w is SR-STE's: the dense row would fail at start-up (exit 1), SR-STE's would run."""
    code = reproduce.main(["--table", "table1", "--scale", "small", "--rows", "dense,srste_2x4", "--seeds", "0",
                           "--out", str(tmp_path), "sparsity.lambda_w=1e-4", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 1
    (err,) = captured.err.splitlines()
    assert err.startswith("error: 1 run(s) would fail at start-up: dense seed0: sparsity.lambda_w is not a known key")
    out = captured.out.splitlines()
    assert [ln for ln in out if ln.startswith("#")] == [f"# dense seed0 would fail: {err.split('dense seed0: ')[1]}"]
    (command,) = [ln for ln in out if "lbc.cli.train" in ln]
    assert "experiment=small/table1/srste_2x4" in command and "sparsity.lambda_w=1e-4" in command
    assert not any(tmp_path.iterdir())


# --- a finished run is skipped only for the command it was run with ------------------------------------


def _finished_run(tmp_path: Path, argv: list[str]) -> tuple[Path, dict[str, bytes]]:
    """The run dir ``argv`` plans, holding a finished 2-epoch run of ``argv``'s overrides; its files' bytes."""
    (run,) = reproduce.plan(reproduce.parse_args([*argv, "--out", str(tmp_path)]))
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "row.json").write_text(json.dumps(run.row_json()))
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump({"schedule": {"epochs": 2}, "seed": 0}))
    (run.run_dir / "metrics.jsonl").write_text('{"epoch": 1, "top1": 50.0}\n{"epoch": 2, "top1": 61.5}\n')
    return run.run_dir, {p.name: p.read_bytes() for p in run.run_dir.iterdir()}


FINISHED = [*SMALL_ONE, "--epochs", "2"]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "real"])
def test_a_finished_run_of_the_same_command_is_skipped(tmp_path: Path, clean_env, capsys, dry: bool) -> None:
    run_dir, files = _finished_run(tmp_path, FINISHED)
    code = reproduce.main([*FINISHED, "--out", str(tmp_path), *(["--dry-run"] if dry else [])])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
    expected = f"# finished, skipped: {run_dir}" if dry else "lbc_2x4 seed0: skipped, finished before (top-1 61.50)"
    assert expected in captured.out and "started" not in captured.out
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files


# (id, arguments beside FINISHED's run, what the one line names)
CHANGED: list[tuple[str, list[str], str]] = [
    ("epochs", [*SMALL_ONE, "--epochs", "3"], "schedule.epochs (2 -> 3)"),
    ("no --epochs", SMALL_ONE, "schedule.epochs (2 -> unset)"),
    ("new lr", [*FINISHED, "optim.lr=0.2"], "optim.lr (unset -> 0.2)"),
    ("unknown key", [*FINISHED, "optim.foo=1"], "optim.foo (unset -> 1)"),
    ("max-steps", [*FINISHED, "--max-steps", "1"], "trainer.max_steps_per_epoch (unset -> 1)"),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize(("args", "culprit"), [c[1:] for c in CHANGED], ids=[c[0] for c in CHANGED])
def test_a_finished_run_of_other_settings_is_refused_and_kept(tmp_path: Path, clean_env, capsys,
                                                             args: list[str], culprit: str, dry: bool) -> None:
    run_dir, files = _finished_run(tmp_path, FINISHED)
    code = reproduce.main([*args, "--out", str(tmp_path), *(["--dry-run"] if dry else [])])
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert code == 2 and captured.out == ""  # the old result is not reported as this command's
    assert line.startswith(f"error: {run_dir} holds a finished run with other settings: ") and culprit in line
    assert "use another --out" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files  # never overwritten


def test_a_finished_run_without_recorded_overrides_is_compared_by_its_config(tmp_path: Path, clean_env, capsys):
    run_dir, _ = _finished_run(tmp_path, FINISHED)
    (run_dir / "row.json").unlink()
    assert reproduce.main([*FINISHED, "--out", str(tmp_path), "--dry-run"]) == 0  # config.yaml agrees
    assert f"# finished, skipped: {run_dir}" in capsys.readouterr().out
    assert reproduce.main([*SMALL_ONE, "--epochs", "3", "--out", str(tmp_path), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{run_dir} holds a finished run with other settings: schedule.epochs (2 -> 3)" in line


def test_settings_changed_names_each_key_once() -> None:
    before = ["experiment=small/table1/lbc_2x4", "schedule.epochs=2", "seed=0", "optim.lr=0.1"]
    now = ["experiment=small/table1/lbc_2x4", "seed=0", "optim.lr=0.2", "+x=1"]
    assert reproduce.settings_changed(before, now) == ["schedule.epochs (2 -> unset)", "optim.lr (0.1 -> 0.2)",
                                                       "x (unset -> 1)"]
    assert reproduce.settings_changed(before, list(reversed(before))) == []  # the order of overrides is no setting


# --- a failed child says why ---------------------------------------------------------------------------

TORCHRUN_FAILURE = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "lbc/engine/trainer.py", line 1, in run
[rank0]: ValueError: boom in the worker
E1202 16:00:00.000000 1 torch/distributed/elastic/multiprocessing/api.py:1: failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
lbc.cli.train FAILED
------------------------------------------------------------
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


@pytest.mark.parametrize(("output", "line"), [
    (TORCHRUN_FAILURE, "ValueError: boom in the worker"),
    ("[rank0]: error: data.root=/x: no such folder\n" + TORCHRUN_FAILURE, "error: data.root=/x: no such folder"),
    ("usage: torchrun ...\ntorchrun: error: argument --nproc-per-node: invalid value\n",
     "torchrun: error: argument --nproc-per-node: invalid value"),
    ("epoch 1/2: loss 1.0\nKilled\n", "Killed"),
    ("", ""),
])
def test_the_error_line_of_a_failed_child(output: str, line: str) -> None:
    assert reproduce._error_line(output) == line


def test_a_failed_torchrun_child_prints_its_last_error_line(tmp_path: Path, clean_env, monkeypatch, capsys) -> None:
    clean_env.setenv("NPROC_PER_NODE", "1")
    script = f"import sys; sys.stderr.write({TORCHRUN_FAILURE!r}); sys.exit(1)"
    monkeypatch.setattr(reproduce, "torchrun_command", lambda train_args, env: [sys.executable, "-c", script])
    code = reproduce.main([*FULL_ONE, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    (failed,) = [ln for ln in out.splitlines() if ": failed (exit 1)" in ln]
    assert "resnet50_lbc_2x4 seed0" in failed and "ValueError: boom in the worker" in failed and "output.log" in failed
    assert "1 failed (resnet50_lbc_2x4 seed0)" in out


# --- scripts/plot_runs.py --------------------------------------------------------------------------------

# (id, how the bad run dir differs from a good one (config.yaml changes), what the one line names)
PLOT_RUN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("schedule a list", {"schedule": [1, 2]}, "config.yaml schedule=[1, 2] is not a mapping"),
    ("sparsity a string", {"sparsity": "lbc"}, "config.yaml sparsity='lbc' is not a mapping"),
    ("model a number", {"model": 3}, "config.yaml model=3 is not a mapping"),
    ("epochs a string", {"schedule": {"epochs": "abc"}}, "config.yaml schedule.epochs='abc' is not a positive integer"),
    ("epochs a float", {"schedule": {"epochs": 2.5}}, "config.yaml schedule.epochs=2.5 is not a positive integer"),
]


@pytest.fixture
def plot_root(real_run: Path, tmp_path: Path) -> Path:  # noqa: F811
    root = tmp_path / "runs"
    write_run(root, "table1", "small", "lbc_2x4", 0, real_run, epochs=2, records=records_of(real_run, [10.0, 40.0]))
    return root


@pytest.mark.parametrize(("config", "culprit"), [c[1:] for c in PLOT_RUN_CASES], ids=[c[0] for c in PLOT_RUN_CASES])
def test_plot_an_unusable_run_is_one_line_and_the_others_plot(real_run: Path, plot_root: Path, tmp_path: Path,  # noqa: F811
                                                              capsys, config: dict[str, Any], culprit: str) -> None:
    bad = write_run(plot_root, "table1", "small", "srste_2x4", 0, real_run, method="srste")
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg.update(config)
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "figs"
    assert plot.main([str(plot_root), "--out", str(out)]) == 0
    assert capsys.readouterr().err.splitlines() == [f"skipped {bad}: {culprit}"]
    assert sorted(p.name for p in out.iterdir()) == ["flops_top1.png", "sparsity.png", "top1.png"]


# (id, --out relative to tmp_path with {file} a plain file, exit status, what the one line names)
PLOT_CASES: list[tuple[str, str, int, str]] = [
    ("out is a file", "{file}", 2, "error: --out {file}: is a file; give a folder for the PNGs"),
    ("out under a file", "{file}/figs", 2, "error: --out {file}/figs: {file} is a file, not a folder"),
    ("out two under a file", "{file}/a/b", 2, "error: --out {file}/a/b: {file} is a file, not a folder"),
]


@pytest.mark.parametrize(("out", "code", "line"), [c[1:] for c in PLOT_CASES], ids=[c[0] for c in PLOT_CASES])
def test_plot_bad_out_is_one_line(plot_root: Path, tmp_path: Path, capsys, out: str, code: int, line: str) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    assert plot.main([str(plot_root), "--out", out.replace("{file}", str(file))]) == code
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line.replace("{file}", str(file))] and captured.out == ""
    assert file.read_text() == "keep me\n"


def test_plot_no_run_dir_is_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert plot.main([str(missing), "--out", str(tmp_path / "figs")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: no readable run") and str(missing) in line
    assert not (tmp_path / "figs").exists()


def test_plot_skips_non_finite_values(real_run: Path, tmp_path: Path) -> None:  # noqa: F811
    write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run, epochs=3,
              records=records_of(real_run, [10.0, float("nan"), 30.0]))
    (run,) = plot.load([tmp_path])
    assert run.series("top1") == ([1, 3], [10.0, 30.0])


# --- scripts/collect_results.py ------------------------------------------------------------------------

# (id, the last record's values, the key and value the line names)
COLLECT_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("top1 NaN", {"top1": float("nan")}, "top1 is nan"),
    ("top1 inf", {"top1": float("inf")}, "top1 is inf"),
    ("top1 -inf", {"top1": float("-inf")}, "top1 is -inf"),
    ("top1 string", {"top1": "99.1"}, "top1 is '99.1'"),
    ("top1 null", {"top1": None}, "top1 is null (NaN or inf when it was logged)"),
    ("top1 bool", {"top1": True}, "top1 is True"),
    ("top1 list", {"top1": [99.1]}, "top1 is [99.1]"),
    ("density NaN", {"sparsity/density": float("nan")}, "sparsity/density is nan"),
    ("flops string", {"sparsity/train_flops_ratio": "0.5x"}, "sparsity/train_flops_ratio is '0.5x'"),
    ("top5 inf", {"top5": float("inf")}, "top5 is inf"),
]


@pytest.mark.parametrize(("final", "culprit"), [c[1:] for c in COLLECT_CASES], ids=[c[0] for c in COLLECT_CASES])
def test_collect_a_non_finite_figure_is_a_broken_run(real_run: Path, tmp_path: Path, capsys,  # noqa: F811
                                                     final: dict[str, Any], culprit: str) -> None:
    path = write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run, final=final)
    assert any(not isinstance(v, float) or not math.isfinite(v) for v in final.values())
    assert collect.main([str(tmp_path), "--scale", "small", "--table", "table1"]) == 0
    captured = capsys.readouterr()
    named = [ln for ln in captured.err.splitlines() if str(path) in ln]
    assert named == [f"skipped {path}: broken: the last record's {culprit}, not a finite number"]
    row = table_rows(captured.out)[[r["id"] for r in PAPER["table1"]["small"]].index("lbc_2x4")]
    assert row[3] == "" and row[-1] == "0/1"  # blank and not counted as finished: 0 of 1 run dirs


@pytest.mark.parametrize(("group", "value"), [("sparsity", "lbc"), ("model", [1]), ("data", 3)])
def test_collect_a_config_group_that_is_not_a_mapping_is_a_broken_run(real_run: Path, tmp_path: Path, capsys,  # noqa: F811
                                                                      group: str, value: Any) -> None:
    path = write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run)
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    cfg[group] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert collect.main([str(tmp_path), "--scale", "small", "--table", "table1"]) == 0
    named = [ln for ln in capsys.readouterr().err.splitlines() if str(path) in ln]
    assert named == [f"skipped {path}: broken: config.yaml {group}={value!r} is not a mapping"]


def test_collect_a_finite_run_beside_a_broken_one_is_pooled_alone(real_run: Path, tmp_path: Path, capsys) -> None:  # noqa: F811
    write_run(tmp_path, "table1", "small", "lbc_2x4", 0, real_run, final={"top1": 70.0})
    write_run(tmp_path, "table1", "small", "lbc_2x4", 1, real_run, final={"top1": float("nan")})
    assert collect.main([str(tmp_path), "--scale", "small", "--table", "table1"]) == 0
    row = table_rows(capsys.readouterr().out)[[r["id"] for r in PAPER["table1"]["small"]].index("lbc_2x4")]
    assert row[3] == "70.00" and row[-1] == "1/2"

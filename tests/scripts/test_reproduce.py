"""scripts/reproduce.py (and scripts/tableN.sh): the small-scale mode of Tables 1 and 5 end to end (a few
steps per row), the full-scale torchrun commands from the environment (one box, SLURM), skipping
finished runs, a failing row that does not stop the others, the SLURM launcher (its missing extra, the
multirun it starts), the small-scale presets at other epochs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from lbc.run.records import read_metrics
from tests.helpers import PYTHON, ROOT, compose_config

SCRIPT = ROOT / "scripts" / "reproduce.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


reproduce = _load()
PAPER = yaml.safe_load((ROOT / "scripts" / "paper_tables.yaml").read_text())["tables"]
# No SLURM/torchrun variables from the machine running the tests leak into the commands.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT")}


def launch(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**CLEAN_ENV, **(env or {})}, timeout=timeout)


def lines_with(text: str, *parts: str) -> list[str]:
    return [ln for ln in text.splitlines() if all(p in ln for p in parts)]


# --- small scale, end to end ---------------------------------------------------------------------------

# 2 epochs of one step of 16 images (and one evaluation batch) per run: the whole table in one process.
T5 = PAPER["table5"]["small"][0]["pattern"]  # Table 5's pattern at small scale (the paper's 1:4)
P5 = T5.replace(":", "x")  # ... in its row ids
QUICK = ["--scale", "small", "--seeds", "0", "--epochs", "2", "--max-steps", "1", "data.loader.batch_size=16"]


@pytest.mark.slow
def test_small_tables_1_and_5_run_end_to_end_and_finished_runs_are_skipped(tmp_path: Path):
    out = tmp_path / "runs"
    for table in ("table1", "table5"):
        done = launch("--table", table, *QUICK, "--out", str(out))
        rows = reproduce.small_rows(table, PAPER, epochs=2)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "epoch 1/" not in done.stdout  # the runs' own lines go to their run dirs, not the console
        for row in rows:  # one line when each row starts, one when it ends with its result
            assert len(lines_with(done.stdout, f" {row.id} seed0: started")) == 1
            assert len(lines_with(done.stdout, f" {row.id} seed0: finished", "top-1", "density")) == 1
        assert f"[{table}/small] done: {len(rows)} finished, 0 skipped, 0 failed" in done.stdout

    def run_dir(table: str, row: str) -> Path:
        return out / table / "small" / row / "seed0"

    def config(table: str, row: str) -> dict[str, Any]:
        return yaml.safe_load((run_dir(table, row) / "config.yaml").read_text())

    for table, count in (("table1", 10), ("table5", 8)):
        dirs = sorted(p for p in (out / table / "small").iterdir())
        assert len(dirs) == count
        for d in dirs:
            path = d / "seed0"
            assert {"config.yaml", "metrics.jsonl", "row.json", "last.pt"} <= {p.name for p in path.iterdir()}
            row = json.loads((path / "row.json").read_text())
            cfg = yaml.safe_load((path / "config.yaml").read_text())
            assert (row["table"], row["row"], row["scale"], row["seed"]) == (table, d.name, "small", 0)
            assert cfg["sparsity"]["method"] == row["method"]
            if row["method"] != "dense":  # dense has a pattern key too (unused): the row says null
                assert cfg["sparsity"]["pattern"] == row["pattern"]
            assert (ROOT / cfg["run_dir"]).resolve() == path.resolve() and cfg["seed"] == 0
            assert len(read_metrics(path)) == cfg["schedule"]["epochs"]

    # Table 1: LBC removes candidates until half the epochs; ASP trains 2 dense + 1 fine-tuning epochs.
    lbc = config("table1", "lbc_1x16")["sparsity"]
    assert (lbc["pattern"], lbc["t_i"], lbc["t_f"]) == ("1:16", 0, 1)
    asp = config("table1", "asp_2x4")
    assert (asp["schedule"]["epochs"], asp["sparsity"]["dense_epochs"]) == (3, 2)
    assert config("table1", "dense")["sparsity"]["method"] == "dense"
    # Table 5: the paper's (t_i, t_f) of 120 epochs, scaled to 2; (0, 0) uses the released selection.
    for ti, tf, small in ((0, 0, (0, 0)), (0, 30, (0, 0.5)), (0, 60, (0, 1)), (30, 60, (0.5, 1))):
        for method in ("srste", "lbc"):
            sp = config("table5", f"{method}_{P5}_ti{ti}_tf{tf}")["sparsity"]
            assert (sp["method"], sp["pattern"], sp["t_i"], sp["t_f"]) == (method, T5, *small)
    assert config("table5", f"lbc_{P5}_ti0_tf0")["sparsity"]["removal"] == "released"
    assert config("table5", f"lbc_{P5}_ti0_tf30")["sparsity"]["removal"] == "paper"
    # paper_row: the paper's row of the same method and pattern, else null
    paper_row = {d.name: json.loads((d / "seed0" / "row.json").read_text())["paper_row"]
                 for d in (out / "table1" / "small").iterdir()}
    assert paper_row["lbc_1x16"] == "resnet50_lbc_1x16" and paper_row["asp_2x4"] == "resnet50_asp_2x4"
    assert paper_row["srste_1x8"] is None and paper_row["lbc_1x8"] is None

    # A second call skips the finished runs: nothing is trained or rewritten.
    metrics = run_dir("table1", "lbc_2x4") / "metrics.jsonl"
    before = (metrics.stat().st_mtime_ns, metrics.read_text())
    again = launch("--table", "table1", *QUICK, "--out", str(out), "--rows", "lbc_2x4,dense")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(lines_with(again.stdout, "lbc_2x4 seed0: skipped, finished before", "top-1")) == 1
    assert not lines_with(again.stdout, "started")
    assert "0 finished, 2 skipped, 0 failed" in again.stdout
    assert (metrics.stat().st_mtime_ns, metrics.read_text()) == before


@pytest.mark.slow
def test_a_failing_row_is_one_line_and_the_others_go_on(tmp_path: Path):
    # sparsity.lambda_w is SR-STE's: the dense row refuses it at start-up, the SR-STE row trains.
    done = launch("--table", "table1", "--scale", "small", "--seeds", "0", "--epochs", "1", "--max-steps", "1",
                  "--rows", "dense,srste_2x4", "--out", str(tmp_path), "data.loader.batch_size=16",
                  "sparsity.lambda_w=1e-4")
    assert done.returncode == 1
    failed = lines_with(done.stdout, "dense seed0: failed (exit 2)")
    assert len(failed) == 1 and "sparsity.lambda_w" in failed[0] and "output.log" in failed[0]
    assert len(lines_with(done.stdout, "srste_2x4 seed0: finished")) == 1
    assert "1 finished, 0 skipped, 1 failed (dense seed0)" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    srste = yaml.safe_load((tmp_path / "table1/small/srste_2x4/seed0/config.yaml").read_text())
    assert srste["sparsity"]["lambda_w"] == pytest.approx(1e-4)  # the extra override reached the run
    # row.json records what a run was started with: the refused row never started, so it has none
    assert "sparsity.lambda_w=1e-4" in json.loads((tmp_path / "table1/small/srste_2x4/seed0/row.json").read_text())["overrides"]
    assert not (tmp_path / "table1/small/dense/seed0/row.json").exists()


def test_a_start_the_trainer_refused_puts_the_previous_row_json_back(tmp_path: Path):
    from types import SimpleNamespace

    run = SimpleNamespace(run_dir=tmp_path, row_json=lambda: {"overrides": ["optim.lr=0.5"]})
    (tmp_path / "row.json").write_text('{"overrides": ["optim.lr=0.1"]}\n')
    (tmp_path / "config.yaml").write_text("optim: {lr: 0.1}\n")
    refused = reproduce.RowRecord(run)
    assert json.loads((tmp_path / "row.json").read_text())["overrides"] == ["optim.lr=0.5"]  # while it runs
    refused.settle()  # config.yaml untouched: the trainer never began
    assert json.loads((tmp_path / "row.json").read_text())["overrides"] == ["optim.lr=0.1"]
    began = reproduce.RowRecord(run)
    tmp = tmp_path / "config.yaml.tmp"
    tmp.write_text("optim: {lr: 0.5}\n")
    tmp.replace(tmp_path / "config.yaml")  # Run.begin's atomic write
    began.settle()
    assert json.loads((tmp_path / "row.json").read_text())["overrides"] == ["optim.lr=0.5"]
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unfinished_run_resumes_in_its_run_dir(tmp_path: Path):
    path = tmp_path / "table4" / "small" / "lbc_1x16" / "seed0"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"schedule": {"epochs": 3}}))
    (path / "metrics.jsonl").write_text('{"epoch": 1, "top1": 50.0}\n{"epoch": 2, "top1": 60.0}\n')
    assert reproduce.run_state(path) == ("partial", 2)
    dry = launch("--table", "table4", "--scale", "small", "--seeds", "0", "--rows", "lbc_1x16", "--out",
                 str(tmp_path), "--dry-run")
    assert f"run_dir={path}" in dry.stdout  # the same run_dir again: the trainer continues from its last.pt
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "top1": 70.0, "sparsity/density": 0.07}\n')
    assert reproduce.run_state(path) == ("finished", 3)
    assert reproduce.summary(path) == "top-1 70.00, density 0.070"
    assert reproduce.run_state(tmp_path / "nothing") == ("new", 0)


def test_a_record_torn_by_a_kill_is_an_unfinished_run(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"schedule": {"epochs": 2}}))
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "top1": 50.0}\n{"epoch": 2, "to')  # the resume drops it
    assert reproduce.run_state(tmp_path)[0] == "partial"


# --- full scale: torchrun from the environment -----------------------------------------------------


def test_full_scale_dry_run_is_one_torchrun_command_per_row(tmp_path: Path):
    done = launch("--table", "table1", "--dry-run", "--out", str(tmp_path), "data.root=/data/imagenet",
                  env={"NPROC_PER_NODE": "4"})
    assert done.returncode == 0, done.stderr
    presets = [r for r in PAPER["table1"]["rows"] if r["preset"]]
    commands = [ln for ln in done.stdout.splitlines() if "lbc.cli.torchrun" in ln]
    assert len(commands) == len(presets) == 17
    for row, line in zip(presets, commands, strict=True):
        assert f" experiment={row['preset']} " in line
        assert "--standalone --nproc_per_node=4 --" in line and " seed=0 " in line
        assert line.endswith(f"run_dir={tmp_path}/table1/full/{row['id']}/seed0")
        assert " data.root=/data/imagenet " in line
        assert (ROOT / "lbc" / "configs" / "experiment" / f"{row['preset']}.yaml").is_file()
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_slurm_allocation_gives_torchrun_its_rendezvous(tmp_path: Path):
    slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-[017-018]",
             "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
    done = launch("--table", "table4", "--dry-run", "--out", str(tmp_path), "data.root=/data/imagenet", env=slurm)
    assert done.returncode == 0, done.stderr
    commands = lines_with(done.stdout, "lbc.cli.torchrun")
    assert len(commands) == 3  # Table 4's rows with a preset (DNW, RigL, GMP, STR are paper only)
    for line in commands:
        assert ("--nnodes=2 --node_rank=1 --nproc_per_node=4 --master_addr=gpu-017 --master_port=29742 --"
                in line)
    # the batch script itself (not an srun step) on a 2-node allocation would wait for a second node forever
    alone = launch("--table", "table4", "--dry-run", "--out", str(tmp_path),
                   env={k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"})
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1 and "srun --ntasks-per-node=1" in alone.stderr


@pytest.mark.parametrize(("env", "expected"), [
    ({"NPROC_PER_NODE": "8"}, ["--standalone", "--nproc_per_node=8"]),
    ({"SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_NODELIST": "n1"},
     ["--standalone", "--nproc_per_node=2"]),
    ({"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "a[1-2]-b[07,9],c3", "SLURM_STEP_ID": "0",
      "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_JOB_ID": "77"},
     ["--nnodes=3", "--node_rank=2", "--nproc_per_node=8", "--master_addr=a1-b07", "--master_port=29577"]),
    # explicit variables win over SLURM's
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "NPROC_PER_NODE": "8",
      "SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "x[1-4]"},
     ["--nnodes=2", "--node_rank=0", "--nproc_per_node=8", "--master_addr=10.0.0.1", "--master_port=1234"]),
])
def test_torchrun_args_from_the_environment(env: dict[str, str], expected: list[str]):
    assert reproduce.torchrun_args(env) == expected


def test_several_nodes_without_an_address_is_one_line():
    with pytest.raises(reproduce.UsageError, match="MASTER_ADDR"):
        reproduce.torchrun_args({"NNODES": "2", "NPROC_PER_NODE": "8"})


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node7", "node7"), ("gpu[03-05,09],cpu1", "gpu03"), ("a,b", "a"), ("r[2,4]n[10-11]", "r2n10")])
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str):
    assert reproduce.first_host(nodelist) == first


# --- the SLURM launcher, the wrappers, the rows -----------------------------------------------------


def test_slurm_launcher_without_the_extra_is_one_line(tmp_path: Path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins") else real(name, *a))
    assert reproduce.main(["--table", "table1", "--launcher", "slurm", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[slurm]'" in err
    assert not any(tmp_path.iterdir())


def test_slurm_dry_run_shows_each_jobs_torchrun_command(tmp_path: Path):
    done = launch("--table", "table2", "--launcher", "slurm", "--dry-run", "--rows", "*lbc_2x4", "--out",
                  str(tmp_path), "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8", "data.root=/coco")
    assert done.returncode == 0, done.stderr
    (line,) = lines_with(done.stdout, "lbc.cli.torchrun")
    assert "--nnodes=2" in line and "--nproc_per_node=8" in line and "experiment=table2/faster_rcnn_r50_fpn_lbc_2x4" in line
    assert "hydra.launcher" not in line and "data.root=/coco" in line  # submission settings stay out of the run


def test_slurm_launcher_runs_the_multirun_in_a_child_with_its_own_command_line(tmp_path: Path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "hydra_plugins.hydra_submitit_launcher" else real(name, *a))
    started = []
    monkeypatch.setattr(reproduce.subprocess, "call", lambda cmd, env: started.append((cmd, env)) or 0)
    args = ["--table", "table4", "--launcher", "slurm", "--out", str(tmp_path), "hydra.launcher.partition=gpu",
            "data.root=/data/imagenet"]
    assert reproduce.main(args) == 1  # nothing ran: every run is reported failed, one line each
    ((cmd, env),) = started
    assert cmd[:2] == [sys.executable, str(SCRIPT)] and env[reproduce.SWEEP_ENV] == "1"
    sweep = Path(next(a for a in cmd if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
    assert cmd[2:4] == ["-m", "hydra/launcher=submitit_slurm"] and "hydra.launcher.partition=gpu" in cmd
    assert {"hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1", "hydra.launcher.max_num_timeout=5"} <= set(cmd)
    assert cmd[-2:] == [f"runs_file={sweep / 'runs.json'}", "index=0,1,2"]
    runs = json.loads((sweep / "runs.json").read_text())
    assert [r["name"] for r in runs] == ["resnet50_dense seed0", "resnet50_srste_1x16 seed0", "resnet50_lbc_1x16 seed0"]
    assert all("data.root=/data/imagenet" in r["overrides"] and not any("hydra" in o for o in r["overrides"])
               for r in runs)
    out = capsys.readouterr().out
    assert len(lines_with(out, "seed0: failed (see its output in")) == 3


def test_in_process_runs_call_lbc_train_with_their_arguments():
    """lbc-train runs in this process through ``lbc.cli.train.main(argv)``: no ``sys.argv`` is edited."""
    import inspect

    from lbc.cli import train

    assert list(inspect.signature(train.main).parameters) == ["argv"]
    source = (ROOT / "scripts" / "reproduce.py").read_text()
    assert "train.main(run.train_args())" in source and "sys.argv =" not in source


@pytest.mark.parametrize("n", range(1, 7))
def test_one_command_per_table(n: int, tmp_path: Path):
    wrapper = ROOT / "scripts" / f"table{n}.sh"
    assert os.access(wrapper, os.X_OK)
    done = subprocess.run(["bash", str(wrapper), "--scale", "small", "--seeds", "3", "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path,
                          env={**CLEAN_ENV, "PYTHON": PYTHON}, timeout=60)
    assert done.returncode == 0, done.stderr
    commands = lines_with(done.stdout, "lbc.cli.train", " seed=3 ")
    assert len(commands) == len(reproduce.small_rows(f"table{n}", PAPER))
    assert all(f"run_dir={tmp_path}/table{n}/small/" in c for c in commands)
    assert all(f" experiment=small/table{n}/" in c for c in commands)


@pytest.mark.parametrize("table", reproduce.TABLES)
def test_small_rows_stand_for_paper_rows_of_the_same_method_and_pattern(table: str):
    rows = reproduce.small_rows(table, PAPER)
    paper = {r["id"]: r for r in PAPER[table]["rows"]}
    assert len({r.id for r in rows}) == len(rows)
    assert any(r.info["method"] == "dense" for r in rows) == (table != "table5")  # as in the paper's tables
    for row in rows:
        if row.info["paper_row"] is not None:
            p = paper[row.info["paper_row"]]
            assert (p["method"], p["pattern"]) == (row.info["method"], row.info["pattern"])
        else:  # a pattern the paper does not have for this method: no paper value beside it
            assert row.info["pattern"] not in {r["pattern"] for r in paper.values() if r["method"] == row.info["method"]}
    matched = sum(r.info["paper_row"] is not None for r in rows)
    t5 = 8 if T5 == "1:4" else 0  # the paper's Table 5 is 1:4
    assert matched == {"table1": 8, "table2": 5, "table3": 5, "table4": 3, "table5": t5, "table6": 5}[table]


def composed_row(table: str, row: str, epochs: int | None = None) -> dict[str, Any]:
    """The resolved config a small-scale row runs with (``--epochs``: ``epochs``), as lbc-train composes it."""
    (r,) = [r for r in reproduce.small_rows(table, PAPER, epochs=epochs) if r.id == row]
    return OmegaConf.to_container(compose_config([*r.overrides, "run_dir=/tmp/lbc-reproduce"]), resolve=True)


def test_small_rows_follow_the_epochs():
    for (a, b), small in zip(((0, 0), (0, 30), (0, 60), (30, 60)), ((0, 0), (0, 3), (0, 6), (3, 6)), strict=True):
        sp = composed_row("table5", f"lbc_{P5}_ti{a}_tf{b}", epochs=12)["sparsity"]
        assert (sp["t_i"], sp["t_f"]) == small
    lbc = composed_row("table1", "lbc_1x4", epochs=6)
    assert (lbc["sparsity"]["t_f"], lbc["schedule"]["epochs"]) == (3, 6)
    asp = composed_row("table1", "asp_2x4", epochs=6)
    assert (asp["schedule"]["epochs"], asp["sparsity"]["dense_epochs"]) == (10, 6)
    det = composed_row("table3", "lbc_2x8", epochs=9)
    assert (det["model"]["name"], det["schedule"]["epochs"], det["schedule"]["milestones"], det["sparsity"]["t_f"]) == (
        "mask_rcnn_r18_fpn_shapes", 9, [6, 8], 4.5)
    assert composed_row("table1", "dense", epochs=1)["schedule"]["warmup_epochs"] == 0  # one epoch: no warm-up
    # without --epochs: the presets' own 12 (ASP 12 + 8; detection 6, steps after 4 and 5)
    assert (composed_row("table1", "lbc_2x4")["sparsity"]["t_f"], composed_row("table1", "lbc_2x4")["schedule"]["epochs"]) \
        == (6, 12)
    asp = composed_row("table1", "asp_2x4")
    assert (asp["schedule"]["epochs"], asp["sparsity"]["dense_epochs"]) == (20, 12)
    det = composed_row("table2", "lbc_2x4")
    assert (det["model"]["name"], det["schedule"]["epochs"], det["schedule"]["milestones"], det["sparsity"]["t_f"]) == (
        "faster_rcnn_r18_fpn_shapes", 6, [4, 5], 3)


def test_small_rows_are_presets_named_in_the_paper_tables_file():
    for table in reproduce.TABLES:
        rows = reproduce.small_rows(table, PAPER)
        assert [r.id for r in rows] == [r["id"] for r in PAPER[table]["small"]]
        for row in rows:
            assert row.overrides == [f"experiment=small/{table}/{row.id}"] and row.preset == f"small/{table}/{row.id}"
            assert row.detection == (table in ("table2", "table3"))


def test_command_line_overrides_replace_the_rows_own():
    merged = reproduce.merge_overrides(["schedule.epochs=8", "sparsity=lbc", "seed=0"], ["schedule.epochs=20", "+x=1"])
    assert merged == ["sparsity=lbc", "seed=0", "schedule.epochs=20", "+x=1"]


@pytest.mark.parametrize(("args", "message"), [
    (["--table", "table9"], "choose from: table1"),
    (["--table", "1", "--rows", "nope*"], "matches no row of table1"),
    (["--table", "1", "--seeds", "a,b"], "--seeds"),
    (["--table", "1", "--epochs", "3"], "--epochs is for --scale small"),
    (["--table", "1", "stray"], "is not an option or a Hydra override"),
])
def test_bad_command_lines_are_one_line(args: list[str], message: str, capsys):
    assert reproduce.main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err

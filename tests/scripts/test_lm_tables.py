"""scripts/lm_tables.py: every row is a preset, the table's arithmetic (gap closed), and refusing a changed command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, compose_config

sys.path.insert(0, str(ROOT / "scripts"))
import lm_tables  # noqa: E402


@pytest.mark.parametrize("table", sorted(lm_tables.TABLES))
def test_every_row_is_a_preset_that_composes(table):
    for row, _, kind in lm_tables.TABLES[table]:
        cfg = compose_config(["task=lm", f"experiment=lm/small/{table}/{row}", "run_dir=x"])
        assert cfg.task.name == "lm"
        assert (cfg.schedule.steps == 0) == (kind in ("dense", "one-shot") and table == "smollm2")
        assert (cfg.sparsity.method == "dense") == (kind == "dense")


def fake_run(out: Path, table: str, row: str, ppl: float, steps: int = 0, seed: int = 0) -> None:
    run_dir = out / table / row / f"seed{seed}"
    run_dir.mkdir(parents=True)
    cmd = lm_tables.command(table, row, seed, [], Path("RUN_DIR"))
    (run_dir / "row.json").write_text(json.dumps({"command": cmd}))
    (run_dir / "config.yaml").write_text(f"schedule:\n  steps: {steps}\n")
    record = {"epoch": 0, "step": steps, "ppl": ppl, "tokens": steps * 1024, "sparsity/train_flops_ratio": 0.75}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (run_dir / "seconds.txt").write_text("120\n")


def test_the_gap_closed_is_measured_from_the_best_one_shot_row(tmp_path):
    fake_run(tmp_path, "smollm2", "dense", 10.0)
    fake_run(tmp_path, "smollm2", "magnitude", 40.0)
    fake_run(tmp_path, "smollm2", "sparsegpt", 20.0)  # the best one-shot row: gap 20 - 10 = 10
    fake_run(tmp_path, "smollm2", "lbc", 13.0, steps=40)  # closes (20 - 13) / 10 = 70%
    fake_run(tmp_path, "smollm2", "srste", 25.0, steps=40)  # worse than the best one-shot: -50%
    text = lm_tables.table_markdown("smollm2", [0], tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 70% |" in rows["LBC, weights trained"] and "| -50% |" in rows["SR-STE"]
    assert "not run" in rows["Wanda, one-shot"]
    assert "40,960" in rows["LBC, weights trained"] and "2.0" in rows["LBC, weights trained"]  # tokens, minutes
    assert "gap 10.00" in text


def test_a_run_dir_of_another_command_is_refused(tmp_path):
    fake_run(tmp_path, "scratch", "dense", 5.0, steps=300)
    record, seconds = lm_tables.run_row("scratch", "dense", 0, [], tmp_path)  # finished, same command: reported
    assert record["ppl"] == 5.0 and seconds == 0.0
    with pytest.raises(SystemExit, match="another command"):
        lm_tables.run_row("scratch", "dense", 0, ["optim.lr=0.1"], tmp_path)


def test_bad_arguments_are_one_line(capsys):
    for argv in (["--table", "smollm2", "--rows", "nope"], ["--table", "scratch", "--seeds", "-1"],
                 ["--table", "scratch", "--seeds", ""], ["--table", "scratch", "stray"]):
        with pytest.raises(SystemExit) as exit_:
            lm_tables.main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lm_tables.py: error:")

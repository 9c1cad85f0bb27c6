"""More of ``lbc-train``'s bad values (issue 20): each is exit status 2 and exactly one line naming the key and
what is allowed, no traceback, nothing left behind. And a diverged run says the truth about its checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lbc.engine.trainer as trainer
from tests.helpers import TINY, run_cli

LONG_NAME = "n" * 300  # over NAME_MAX (255 bytes per name on Linux file systems)
DEEP = "/".join(["d" * 200] * 25)  # 5024 characters: every name fits, the path is over PATH_MAX (4096)

CASES: list[tuple[str, list[str], str]] = [
    # (id, overrides, the exact part of the line)
    ("negative seed", ["seed=-1"], "seed=-1 is not allowed; use an integer from 0 to 2**63-1 (9223372036854775807)"),
    ("seed of 2**64", [f"seed={2**64}"], f"seed={2**64} is not allowed; use an integer from 0 to 2**63-1"),
    ("seed over 2**64", [f"seed={2**70}"], f"seed={2**70} is not allowed; use an integer from 0 to 2**63-1"),
    ("seed just over the range", [f"seed={2**63}"], f"seed={2**63} is not allowed; use an integer from 0 to 2**63-1"),
    ("fractional seed", ["seed=1.5"], "seed=1.5 is not allowed; use an integer"),
    ("run_dir name over NAME_MAX", [f"run_dir=out/{LONG_NAME}"], "bytes per name (NAME_MAX); use shorter names"),
    ("run_dir name over NAME_MAX, absolute", ["run_dir={tmp}/" + LONG_NAME + "/x"], "a folder name of 300 bytes"),
    ("run_dir over PATH_MAX", [f"run_dir=out/{DEEP}"], "bytes (PATH_MAX); use a shorter run_dir"),
    ("hydra.run.dir name over NAME_MAX", [f"hydra.run.dir=out/{LONG_NAME}"], "hydra.run.dir=out/"),
]


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_one_exact_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides,
                                                expected):
    monkeypatch.chdir(tmp_path)
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    if not any(o.startswith(("run_dir=", "hydra.run.dir=")) for o in overrides):
        overrides.append(f"run_dir={tmp_path / 'run'}")
    code, out, err = run_cli(*TINY, *overrides)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert len(err) < 400, err  # a long path is shortened in the line
    assert "Traceback" not in err + out
    assert sorted(os.listdir(tmp_path)) == []  # nothing was created


def test_a_seed_at_the_top_of_the_range_trains(tmp_path: Path):
    """The range is what the run can use: 2**63-1 plus the per-rank and per-epoch offsets still seeds torch."""
    code, _, err = run_cli(*TINY, "schedule.epochs=1", f"seed={2**63 - 1}", f"run_dir={tmp_path / 'run'}")
    assert code == 0, err
    assert (tmp_path / "run" / "last.pt").is_file()


def test_a_diverged_run_without_checkpoint_says_none_was_written(tmp_path: Path):
    run_dir = tmp_path / "nan"
    code, _, err = run_cli(*TINY, "sparsity=dense", "optim.lr=1e300", f"run_dir={run_dir}")
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: loss is "), err
    assert f"no checkpoint was written in {run_dir}: lower optim.lr or set trainer.clip_grad and run again " \
           "(it starts over)" in err, err
    assert "last good checkpoint" not in err and not (run_dir / "last.pt").exists()


def test_a_diverged_run_names_the_checkpoint_that_exists_and_its_epoch(tmp_path: Path, monkeypatch):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(*TINY, "schedule.epochs=1", f"run_dir={run_dir}")
    assert code == 0 and torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 1, err

    def diverges(cfg):  # the loss of the next epoch is nan (what loop.py raises)
        raise FloatingPointError("loss is nan at epoch 2, step 3; stopping")

    monkeypatch.setattr(trainer, "run", diverges)
    code, _, err = run_cli(*TINY, "schedule.epochs=1", f"run_dir={run_dir}")
    assert code == 1, err
    assert err == (f"error: loss is nan at epoch 2, step 3; stopping (the last good checkpoint is {run_dir}/last.pt "
                   "(epoch 1): set trainer.clip_grad and run again to resume from it, or lower optim.lr with a "
                   "new run_dir)\n"), err

"""A refused second run leaves an existing run directory byte for byte as it was (issue 20).

Hydra used to write ``.hydra/config.yaml`` and ``overrides.yaml`` (and open ``train.log``) before any of our
checks ran, so a bad value, a refused resume or a run refused because another one holds the directory
rewrote the record of the finished run: it then said what never ran. Now nothing is written into a run
directory before its lock is held and the run accepted (``hydra.output_subdir: null``, ``RunLog``,
``Run.begin`` writes ``.hydra/``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml

from lbc.run import rundir
from tests.helpers import TINY, run_cli

FINISHED = [*TINY, "schedule.epochs=1", "sparsity.pattern=2:4"]


def changed(*overrides: str) -> list[str]:
    """FINISHED's overrides with ``overrides`` in place of those of the same key (the same command, changed)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [*(o for o in FINISHED if o.split("=", 1)[0] not in keys), *overrides]


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under ``run_dir`` (hidden ones too) -> the SHA-256 of its bytes."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run, its record written by lbc-train."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = run_cli(*FINISHED, f"run_dir={run_dir}")
    assert code == 0, err
    logging.shutdown()  # flush train.log
    return run_dir


def test_the_finished_run_has_its_record(finished: Path):
    """Run.begin wrote Hydra's record once the run was accepted: the config that ran and its overrides."""
    files = snapshot(finished)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log", "last.pt",
            "config.yaml", "metrics.jsonl"} <= files.keys()
    overrides = yaml.safe_load((finished / ".hydra" / "overrides.yaml").read_text())
    assert overrides == [*FINISHED, f"run_dir={finished}"]
    saved = yaml.safe_load((finished / ".hydra" / "config.yaml").read_text())
    assert saved["sparsity"]["pattern"] == "2:4" and saved["schedule"]["epochs"] == 1
    hydra = yaml.safe_load((finished / ".hydra" / "hydra.yaml").read_text())
    assert hydra["hydra"]["overrides"]["task"] == overrides
    assert "lbc: resnet_small on digits" in (finished / "train.log").read_text()


REFUSED = [
    # (what, overrides, a word the one line names)
    ("bad value while composing", ["optim.lr=abc"], "optim.lr"),
    ("bad value in the checks", ["optim.lr=-1"], "optim.lr"),
    ("bad value found after the lock", ["model.name=nope"], "model.name"),
    ("data error found after the lock", ["data.loader.batch_size=5000"], "data.loader.batch_size"),
    ("refused resume: changed sparsity", ["sparsity.pattern=1:4"], "not lbc 1:4"),
    ("refused resume: changed seed", ["seed=3"], "seed"),
]


@pytest.mark.parametrize("what, overrides, key", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_run_leaves_every_file_byte_identical(finished: Path, what, overrides, key):
    before = snapshot(finished)
    code, out, err = run_cli(*changed(*overrides), f"run_dir={finished}")
    logging.shutdown()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and key in err, err
    assert snapshot(finished) == before


def test_a_run_refused_because_another_holds_the_directory_writes_nothing(finished: Path):
    holder = rundir.acquire(finished)  # another live run of this directory (the lock is the kernel's flock)
    try:
        before = snapshot(finished)
        code, _, err = run_cli(*changed("sparsity=srste"), f"run_dir={finished}")  # another method, same dir
        logging.shutdown()
        assert code == 2 and err.count("\n") == 1 and "is in use by pid" in err, err
        assert snapshot(finished) == before
    finally:
        holder.release()


def test_a_refused_run_leaves_no_new_directory_behind(tmp_path: Path):
    """A fresh run dir refused after Hydra made it: nothing of it is left (no train.log, no .hydra/)."""
    code, _, err = run_cli(*TINY, "model.name=nope", f"run_dir={tmp_path / 'new'}")
    assert code == 2, err
    assert not (tmp_path / "new").exists()


def test_run_log_waits_until_the_run_begins(tmp_path: Path):
    """RunLog: no file until open_run_log; then the records that waited, in order, and the later ones."""
    handler = rundir.RunLog(str(tmp_path / "train.log"))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("lbc.test_run_log")
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    try:
        log.info("before the lock")
        assert not (tmp_path / "train.log").exists()
        rundir.open_run_log(tmp_path / "elsewhere")  # another run's directory: not this log
        assert not (tmp_path / "train.log").exists()
        handler.open()
        log.warning("after")
        handler.flush()
        assert (tmp_path / "train.log").read_text() == "INFO before the lock\nWARNING after\n"
    finally:
        log.removeHandler(handler)
        handler.close()
    dropped = rundir.RunLog(str(tmp_path / "rank1.log"))
    dropped.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "never", None, None))
    dropped.drop()
    dropped.open()
    assert not (tmp_path / "rank1.log").exists()

"""End-to-end training: resume reproduces the uninterrupted run bit for bit; metrics.jsonl; checkpoints."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest

import lbc.engine.trainer as trainer
from lbc.engine import checkpoint
from tests.helpers import assert_same_state

REQUIRED = {"epoch", "step", "train_loss", "top1", "top5", "lr", "seconds", "skipped"}


def params(run_dir):
    return checkpoint.load(run_dir / "last.pt")


class Crash(RuntimeError):
    pass


def crash_in_epoch(monkeypatch, at: int) -> None:
    real = trainer.train_one_epoch

    def flaky(*args, epoch, **kwargs):
        if epoch == at:
            raise Crash(f"simulated crash in epoch {epoch}")
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", flaky)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", ["dense", "lbc"])
def test_resume_reproduces_the_uninterrupted_run(make_config, tmp_path, monkeypatch, sparsity):
    over = [f"sparsity={sparsity}"] + (["sparsity.t_f=1", "trainer.ema=true"] if sparsity == "lbc" else [])
    straight = trainer.run(make_config(*over, run_dir=tmp_path / "straight"))

    # Crash in the second epoch: last.pt from the first survives, and the same run_dir resumes.
    crash_in_epoch(monkeypatch, at=1)
    with pytest.raises(Crash):
        trainer.run(make_config(*over, run_dir=tmp_path / "crashed"))
    shutil.copy(tmp_path / "crashed" / "last.pt", tmp_path / "epoch1.pt")
    monkeypatch.undo()
    resumed = trainer.run(make_config(*over, run_dir=tmp_path / "crashed"))
    assert_same_state(params(tmp_path / "straight"), params(tmp_path / "crashed"))
    assert resumed["top1"] == straight["top1"]

    # An explicit trainer.resume into a fresh run dir does the same.
    trainer.run(make_config(*over, f"trainer.resume={tmp_path / 'epoch1.pt'}", run_dir=tmp_path / "explicit"))
    assert_same_state(params(tmp_path / "straight"), params(tmp_path / "explicit"))

    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


# classification's epoch line as it has always read (README's first command)
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): loss \d+\.\d{4}  top-1 \d+\.\d{2}  top-5 \d+\.\d{2}  "
                        r"lr \d\.\d{2}e[-+]\d{2}  density \d\.\d{3}  \d+\.\ds$")


@pytest.mark.slow
def test_run_dir_contents_and_metrics(make_config, tmp_path, caplog):
    cfg = make_config("trainer.ema=true", "optim=adamw", "optim.lr=1e-3")
    with caplog.at_level(logging.INFO, logger="lbc"):
        result = trainer.run(cfg)
    run_dir = tmp_path / "run"
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "last.pt"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert "${" not in (run_dir / "config.yaml").read_text()  # resolved
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg.schedule.epochs
    for epoch, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert REQUIRED <= record.keys() and record["epoch"] == epoch and record["step"] == epoch * 3  # smoke: 3 a epoch
        assert 0 <= record["top1"] <= record["top5"] <= 100 and record["skipped"] == 0
        assert "sparsity/density" in record and "ema_top1" in record
    # one line per epoch, built from the record it wrote (the same numbers, rounded as printed)
    printed = [m for m in caplog.messages if m.startswith("epoch ")]
    assert len(printed) == len(lines) and all(EPOCH_LINE.match(m) for m in printed), printed
    for line, message in zip(lines, printed, strict=True):
        record = json.loads(line)
        assert message.startswith(f"epoch {record['epoch']}/{cfg.schedule.epochs}: loss {record['train_loss']:.4f}  "
                                  f"top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}  lr {record['lr']:.2e}  "
                                  f"density {record['sparsity/density']:.3f}  "), message
    ckpt = checkpoint.load(run_dir / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "sparsity", "epoch", "rng", "config"} <= ckpt.keys()
    assert {"torch", "cuda", "numpy", "python"} <= ckpt["rng"][0].keys()
    assert result["run_dir"] == str(run_dir)
    # The default method is LBC 2:4 with t_f at half the (2) epochs: exactly 2:4 at the end.
    assert cfg.sparsity.method == "lbc" and result["sparsity/exact_nm"] == 1.0
    assert 0.5 <= result["sparsity/density"] < 0.6  # 2:4 layers at 1/2, the dense stem and classifier above

    # A finished run resumed again trains nothing more and reports the same.
    again = trainer.run(cfg)
    assert again["top1"] == result["top1"]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == cfg.schedule.epochs

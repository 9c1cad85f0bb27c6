"""metrics.jsonl: one schema, one writer, one reader (lbc/run/records.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lbc.run.records import METRICS_FILE, MetricsError, MetricsRecord, last_metrics, read_metrics
from lbc.run.records import progress_line as line_of


def test_missing_file_is_no_record(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) == [] and last_metrics(tmp_path) == {}
    assert read_metrics(tmp_path / "not_there") == []


def test_append_then_read_round_trip(tmp_path: Path) -> None:
    record = MetricsRecord(tmp_path / "run")
    record.append({"epoch": 1, "step": 10, "top1": 12.5, "sparsity/density": 0.5})
    record.append({"epoch": 2, "step": 20, "top1": 25.0, "sparsity/density": 0.5})
    assert read_metrics(tmp_path / "run") == [{"epoch": 1, "step": 10, "top1": 12.5, "sparsity/density": 0.5},
                                             {"epoch": 2, "step": 20, "top1": 25.0, "sparsity/density": 0.5}]
    assert last_metrics(tmp_path / "run")["epoch"] == 2


def test_nan_inf_and_tensor_scalars_become_json(tmp_path: Path) -> None:
    MetricsRecord(tmp_path).append({"epoch": 1, "step": 3, "a": math.nan, "b": -math.inf, "c": np.float32(0.25),
                                    "d": torch.tensor(2.0), "e": np.int64(7)})
    line = (tmp_path / METRICS_FILE).read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"epoch": 1, "step": 3, "a": None, "b": None, "c": 0.25, "d": 2.0, "e": 7}
    assert read_metrics(tmp_path)[0]["a"] is None


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    record = MetricsRecord(tmp_path, enabled=False)
    record.append({"epoch": 1, "step": 1})
    record.truncate_after(0)
    record.close()
    assert not (tmp_path / METRICS_FILE).exists()


@pytest.mark.parametrize(("text", "message"), [
    ('{"epoch": 1, "top1": 3.0}\n{"epoch": 2, "to', "metrics.jsonl line 2 is not JSON"),  # killed mid-append
    ("{oops\n", "metrics.jsonl line 1 is not JSON"),
    ('{"epoch": 1}\n\n[1, 2]\n', "metrics.jsonl line 3 has no integer 'epoch'"),
    ('{"epoch": "1"}\n', "metrics.jsonl line 1 has no integer 'epoch'"),
    ('{"epoch": true}\n', "metrics.jsonl line 1 has no integer 'epoch'"),
])
def test_a_broken_line_is_one_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / METRICS_FILE).write_text(text)
    with pytest.raises(MetricsError) as err:
        read_metrics(tmp_path)
    assert str(err.value) == message
    with pytest.raises(MetricsError):
        last_metrics(tmp_path)


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('\n{"epoch": 1, "step": 2}\n   \n')
    assert read_metrics(tmp_path) == [{"epoch": 1, "step": 2}]


def test_truncate_after_keeps_earlier_lines_verbatim_and_drops_a_torn_line(tmp_path: Path) -> None:
    lines = ['{"epoch": 1, "step": 4, "top1": 0.1}', '{"epoch": 2, "step": 8, "top1": 0.2}',
             '{"epoch": 3, "step": 12, "top1": 0.3}']
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + '\n{"epoch": 4, "st')
    MetricsRecord(tmp_path).truncate_after(2)
    assert (tmp_path / METRICS_FILE).read_text() == lines[0] + "\n" + lines[1] + "\n"
    MetricsRecord(tmp_path).truncate_after(0)
    assert read_metrics(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temp file left


def test_tensorboard_events_beside_the_record(tmp_path: Path) -> None:
    record = MetricsRecord(tmp_path, tensorboard=True)
    record.scalars({"loss": 1.0, "flag": True, "name": "x"}, 1, prefix="train/")
    record.append({"epoch": 1, "step": 1, "top1": 1.0})
    record.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert MetricsRecord(tmp_path / "quiet").tb is None  # no TensorBoard unless asked


# --- the progress line: one formatter for every task ----------------------------------------------


def test_progress_line_of_each_task() -> None:
    classification = {"epoch": 3, "step": 30, "train_loss": 0.31779, "lr": 0.0905, "train_images": 360,
                      "val_loss": 1.9, "top1": 26.944, "top5": 87.5, "ema_top1": 20.0, "seconds": 2.06,
                      "skipped": 0, "sparsity/density": 0.7549, "sparsity/exact_nm": 0.0}
    assert line_of(classification, 15) == (
        "epoch 3/15: loss 0.3178  top-1 26.94  top-5 87.50  lr 9.05e-02  density 0.755  2.1s")
    detection = {"epoch": 3, "step": 180, "train_loss": 1.23449, "lr": 0.02, "seconds": 41.23, "coco/bbox_mAP": 0.015,
                 "coco/bbox_mAP_50": 0.04, "coco/segm_mAP": 0.025, "sparsity/density": 0.5513}
    assert line_of(detection, 6) == (
        "epoch 3/6: loss 1.2345  bbox_mAP 0.015  segm_mAP 0.025  lr 2.00e-02  density 0.551  41.2s")
    lm = {"epoch": 0, "step": 20, "tokens": 2560, "lr": 0.003, "seconds": 1.24, "train_loss": 2.91204,
          "ppl": 18.0449, "val_loss": 2.893, "tokens_per_s": 900.0, "sparsity/density": 0.5}
    assert line_of(lm, 30, unit="step") == "step 20/30: loss 2.9120  ppl 18.04  lr 3.00e-03  density 0.500  1.2s"


def test_progress_line_leaves_out_what_the_record_lacks_and_says_n_a_for_null() -> None:
    assert line_of({"epoch": 1, "step": 4, "coco/bbox_mAP": 0.25}, 2) == "epoch 1/2: bbox_mAP 0.250"
    assert line_of({"epoch": 0, "step": 0, "ppl": None, "sparsity/density": 1.0}, 6, unit="step") == (
        "step 0/6: ppl n/a  density 1.000")


def test_append_returns_the_record_as_written_and_the_line_is_built_from_it(tmp_path: Path) -> None:
    record = {"epoch": 2, "step": 8, "train_loss": np.float32(0.5), "top1": torch.tensor(50.0), "top5": math.nan,
              "lr": 0.1, "seconds": 1.0}
    for enabled in (True, False):  # rank 0 writes; the others get the same record back
        written = MetricsRecord(tmp_path / str(enabled), enabled=enabled).append(record)
        assert written == {"epoch": 2, "step": 8, "train_loss": 0.5, "top1": 50.0, "top5": None, "lr": 0.1,
                           "seconds": 1.0}
    assert read_metrics(tmp_path / "True") == [written]
    assert line_of(written, 4) == "epoch 2/4: loss 0.5000  top-1 50.00  top-5 n/a  lr 1.00e-01  1.0s"

"""metrics.jsonl: one schema, one writer, one reader (lbc/run/records.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lbc.run.records import METRICS_FILE, MetricsError, MetricsRecord, last_metrics, read_metrics


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

"""benchmarks/step_time.py: every variant timed against dense in one run, the load beside it, the LBC update as a
share of a dense ResNet-50 step; ``--profile`` shows where each variant's time goes, op by op."""

from __future__ import annotations

import json
import sys

import pytest

from tests.benchmarks.test_op_count import _load


@pytest.fixture
def step_time(monkeypatch):
    return _load(monkeypatch, "step_time")


@pytest.mark.slow
def test_step_time_reports_every_variant_against_dense_and_the_update_share(step_time, monkeypatch, capsys):
    monkeypatch.setattr(step_time, "time_dense_resnet50_step", lambda device, steps=3: 10.0)  # no 224 px R50 here
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--sizes", "2x32", "--steps", "2", "--resnet50-steps", "1",
                                      "--variants", "lbc_removing_late", "asp_finetune"])
    step_time.main()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["2x32"]) == ["dense", "lbc_removing_late", "asp_finetune"]  # dense is always measured
    for row in result["2x32"].values():
        assert row["ms"] > 0 and row["ratio"] == pytest.approx(row["ms"] / result["2x32"]["dense"]["ms"])
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3 and "load [" in out
    assert result["lbc_update_resnet50_ms"] > 0
    assert result["lbc_update_share_of_resnet50_step"] == pytest.approx(result["lbc_update_resnet50_ms"] / 1e4)


def test_step_time_profile_lists_ops_per_variant_and_refuses_unknown_variants(step_time, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--profile", "--sizes", "2x32", "--steps", "1",
                                      "--variants", "asp_finetune"])
    step_time.main()
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    assert header.split()[1:] == ["dense", "asp_finetune"]
    total = next(line for line in lines if line.startswith("total"))
    assert all(float(v) > 0 for v in total.split()[1:])
    assert any(line.startswith("aten::") for line in lines)
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--variants", "lbc_fast"])
    with pytest.raises(SystemExit) as stop:
        step_time.main()
    assert stop.value.code == 2 and "unknown variant(s) lbc_fast" in capsys.readouterr().err

"""benchmarks/inference.py runs end to end (on a tiny model) and reports ratios of the same backend and batch."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_inference_benchmark_prints_and_writes_ratios(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("inference_benchmark", ROOT / "benchmarks" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--models", "resnet_small", "--image-size", "32", "--device", "cpu", "--batch-sizes", "2",
            "--ort-batch-sizes", "2", "--iters", "2", "--warmup", "1", "--json", str(tmp_path / "rows.json")]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "dense ms" in out and "2:4 sparse tensor cores: " in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["backend"], r["batch"]) for r in rows] == [("onnxruntime", 2), ("torch", 2)]
    for r in rows:
        assert r["dense_ms"] > 0 and r["exported_ratio"] == pytest.approx(r["exported_ms"] / r["dense_ms"])
        assert r["dtype"] == "float32" and "accelerated_ms" not in r  # no 2:4 kernels on a CPU

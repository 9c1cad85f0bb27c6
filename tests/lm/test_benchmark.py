"""benchmarks/lm_step_time.py runs end to end on a tiny LLaMA: every variant timed against dense in one run,
the figures consistent with each other, LBC's score memory as C(M,N)/M says; a bad variant fails in one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys

import pytest

from lbc.errors import ConfigError
from lbc.sparsity.lbc import LBCOptions
from lbc.sparsity.options import SparsityOptions, check_options
from tests.helpers import ROOT

pytest.importorskip("transformers")


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/lm_step_time.py as a module (in sys.modules while it runs: its dataclass looks itself up)."""
    spec = importlib.util.spec_from_file_location("lm_step_time", ROOT / "benchmarks" / "lm_step_time.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_variant_is_timed_against_dense(bench, tmp_path, capsys):
    path = tmp_path / "lm.json"
    argv = ["--model", "llama_tiny", "--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu",
            "--profile", "lbc_removing", "--json", str(path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    rows, skipped = result["variants"], result["skipped"]

    has_train_weights = "train_weights" in {f.name for f in dataclasses.fields(LBCOptions)}
    expected = set(bench.VARIANTS) - (set() if has_train_weights else {"lbc_frozen_weights"})
    assert set(rows) == expected and set(skipped) == set(bench.VARIANTS) - expected
    dense = rows["dense"]["median_ms"]
    assert rows["dense"]["ratio"] == 1.0
    for name, row in rows.items():
        assert len(row["step_ms"]) == 2 and row["median_ms"] > 0
        assert row["median_ms"] == pytest.approx((row["step_ms"][0] + row["step_ms"][1]) / 2)  # median of two
        assert row["ratio"] == pytest.approx(row["median_ms"] / dense)
        assert f"| {name} | {row['median_ms']:.1f} | {row['ratio']:.3f} |" in out
    assert rows["lbc_removing"]["target"] == 1.15 and rows["lbc_after_t_f"]["target"] == 1.03
    assert rows["srste"]["met"] == (rows["srste"]["ratio"] <= 1.15)
    assert result["threads"] == 1 and len(result["load_before"]) == len(result["load_after"]) == 3
    assert "load average (1, 5, 15 min) before: " in out

    # 2:4: C(4, 2) = 6 candidate scores per group of 4 weights; float32 scores: 4 bytes each
    memory = result["score_memory"]
    assert memory["scores_per_weight"] == pytest.approx(math.comb(4, 2) / 4) == 1.5
    assert memory["bytes_per_weight"] == pytest.approx(1.5 * 4)
    # Eq. 6 at step 1 of t_f = 10^6: ceil(5 * (1 - (1 - 1e-6)^3)) = 1 removed; at t_f = 1 all but one (5) go
    assert result["removal"]["lbc_removing"]["removed_per_group"] == 1
    assert result["removal"]["lbc_after_t_f"]["removed_per_group"] == 5

    ops = result["ops_per_step"]
    assert set(ops) == set(rows)
    assert ops["lbc_removing"]["leaf_aten_ops"] > ops["dense"]["leaf_aten_ops"] > 0  # the masks cost ops
    assert "top 15 ops by self CPU time" in out and "_LBCMask" in out


@pytest.mark.parametrize("flag", ["--variants", "--profile"])
def test_unknown_variant_is_one_line_error(bench, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", "llama_tiny", flag, "lbc_nope"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "unknown variant 'lbc_nope'" in errors[0] and "lbc_removing" in errors[0]


def test_frozen_weights_is_skipped_where_lbc_lacks_the_option(bench, monkeypatch, tmp_path, capsys):
    # the line lbc.sparsify gives for a keyword the method's options lack, made by the same check
    with pytest.raises(ConfigError) as missing:
        check_options(SparsityOptions, "lbc", {"train_weights": False})
    real_sparsify = bench.lbc.sparsify

    def sparsify(model, **options):
        if "train_weights" in options:
            raise missing.value
        return real_sparsify(model, **options)

    monkeypatch.setattr(bench.lbc, "sparsify", sparsify)
    path = tmp_path / "lm.json"
    argv = ["--model", "llama_tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
            "--variants", "lbc_frozen_weights", "lbc_after_t_f", "--json", str(path)]
    assert bench.main(argv) == 0
    result = json.loads(path.read_text())
    assert set(result["variants"]) == {"dense", "lbc_after_t_f"} and set(result["skipped"]) == {"lbc_frozen_weights"}
    assert "| lbc_frozen_weights | skipped: this lbc has no train_weights option" in capsys.readouterr().out

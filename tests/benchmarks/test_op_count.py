"""benchmarks/op_count.py counts the aten ops of a training step (views apart) and benchmarks/compile_step_time.py
compiles every method's step in one graph (fullgraph=True), recompiling only when LBC's scores freeze at t_f."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import lbc
from tests.helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


def _load(monkeypatch: pytest.MonkeyPatch, name: str):
    """benchmarks/<name>.py as a module; benchmarks/ on sys.path for its ``from step_time import ...``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def op_count(monkeypatch):
    return _load(monkeypatch, "op_count")


@pytest.fixture
def compile_bench(monkeypatch):
    return _load(monkeypatch, "compile_step_time")


def test_counter_counts_kernels_not_views(op_count):
    x = torch.randn(4, 6)
    with op_count.OpCounter() as counter:
        y = x.reshape(-1) * 2  # a reshape that is a view: no kernel; mul: one
        y.add_(1).view(6, 4).sum()
        x.t().reshape(-1)  # t: no kernel; a reshape that cannot be a view copies: one clone
    assert dict(counter.ops) == {"aten.mul": 1, "aten.add_": 1, "aten.sum": 1, "aten.clone": 1}
    assert counter.no_kernel["aten.t"] == 1 and sum(counter.no_kernel.values()) >= 3


def test_extra_ops_keeps_only_what_dense_lacks(op_count):
    extra = op_count.extra_ops({"aten.mul": 5, "aten.add": 2, "aten.lt": 3}, {"aten.mul": 2, "aten.add": 4})
    assert extra == {"aten.lt": 3, "aten.mul": 3}


@pytest.mark.slow
def test_op_count_script_every_variant(op_count, capsys):
    assert op_count.main(["--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    rows = result["variants"]
    assert list(rows) == list(op_count.VARIANTS)  # one entry per variant, dense first
    dense = rows["dense"]
    assert dense["ops"] > 0 and dense["extra"] == 0 and dense["layers"] == 0
    for name, r in rows.items():
        assert r["ops"] > 0 and r["ops"] == sum(r["by_op"].values())
        assert r["extra"] == r["ops"] - dense["ops"]
        assert f"| {name} | {r['ops']} |" in "\n".join(out)
        if name != "dense":
            assert r["layers"] > 0 and r["extra_per_layer"] == pytest.approx(r["extra"] / r["layers"])
            assert all(n > 0 for n in r["top_extra"].values()) and len(r["top_extra"]) <= 8
    assert dense["ops"] < rows["srste"]["ops"] and dense["ops"] < rows["lbc_removing"]["ops"]
    # the same convolutions forward and backward in every variant: masking adds ops, it never drops a layer's
    for r in rows.values():
        assert r["by_op"]["aten.convolution"] == dense["by_op"]["aten.convolution"]
        assert r["by_op"]["aten.convolution_backward"] == dense["by_op"]["aten.convolution_backward"]


def _tiny_net() -> nn.Module:
    """Stem, two maskable convs (input channels divisible by 4) with BatchNorm, a classifier: 2 masked layers."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _variant(options: dict, epoch: float):
    torch.manual_seed(0)
    model = _tiny_net()
    sp = lbc.sparsify(model, **copy.deepcopy(options))
    sp.update(epoch)
    return model, sp


def _step(run, model, sp, epoch, x, y) -> dict[str, torch.Tensor]:
    sp.update(epoch)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(run(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_every_variant_compiles_in_one_graph(compile_bench):
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    for name, (options, epoch) in compile_bench.VARIANTS.items():
        model, sp = _variant(options, epoch)
        graphs, breaks = compile_bench.graph_breaks(model, x)
        assert (graphs, breaks) == (1, []), name
        eager = _step(model, model, sp, epoch, x, y)
        model, sp = _variant(options, epoch)
        compiled = compile_bench.compile_model(model, "aot_eager", fullgraph=True)  # a graph break would raise
        traced = _step(compiled, model, sp, epoch, x, y)
        assert traced.keys() == eager.keys() and (any("scores" in n for n in eager) ==
                                                  (options["method"] == "lbc" and epoch < options["t_f"])), name
        for key in eager:
            torch.testing.assert_close(traced[key], eager[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


class _Breaks(nn.Module):
    def forward(self, x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2


@pytest.mark.slow
def test_graph_breaks_names_the_break_and_its_line(compile_bench):
    graphs, breaks = compile_bench.graph_breaks(_Breaks(), torch.randn(3))
    assert graphs == 2 and len(breaks) == 1 and "test_op_count.py:" in breaks[0]


@pytest.mark.slow
def test_lbc_recompiles_once_when_its_scores_freeze_at_t_f(compile_bench):
    options, epoch = compile_bench.VARIANTS["lbc_removing"]
    model, sp = _variant(options, epoch)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    torch._dynamo.reset()
    compiled = compile_bench.compile_model(model, "aot_eager", fullgraph=True)
    counters = compile_bench.counters["stats"]
    start = counters["unique_graphs"]
    with compile_bench.recompile_reasons() as reasons:
        _step(compiled, model, sp, epoch, x, y)
        _step(compiled, model, sp, epoch, x, y)  # same epoch: no recompile
        assert counters["unique_graphs"] - start == 1 and reasons == []
        sp.update(options["t_f"])  # one candidate left: the scores stop training
        grads = _step(compiled, model, sp, epoch, x, y)
        _step(compiled, model, sp, epoch, x, y)
    assert not any("scores" in n for n in grads)
    assert counters["unique_graphs"] - start == 2 and len(reasons) == 1 and "requires_grad" in reasons[0]

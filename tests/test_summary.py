"""Test-time counts as the paper counts them (Table 4); the command line is tested in tests/cli/test_summary.py."""

from pathlib import Path

import torchvision
from torch import nn
from torch.nn.utils import parametrize

import lbc
from lbc.summary import summarize

ROOT = Path(__file__).resolve().parents[1]


def test_hand_counted_model():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1, bias=False), nn.Flatten(), nn.Linear(256, 10))
    totals = summarize(model, "2:4", input_size=(3, 4, 4))["totals"]
    # conv0 (stem, dense): 3*16 + 16 bias; conv1 at 2:4: 256 -> 128; fc (classifier, dense): 2560 + 10
    assert totals["params_total"] == 64 + 256 + 2570
    assert totals["params_nonzero"] == 64 + 128 + 2570
    # MACs on a 4x4 image: conv0 16*3*16, conv1 16*16*16 (half at 2:4), fc 256*10
    assert totals["flops_dense"] == 768 + 4096 + 2560
    assert totals["flops_sparse"] == 768 + 2048 + 2560


def test_summary_attaches_nothing_and_reads_a_sparsified_model_too():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(256, 16), nn.Linear(16, 10))
    rows = summarize(model, "2:4", input_size=(3, 4, 4), exclude="3")["rows"]  # one glob, as a string
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [r["density"] for r in rows] == [1.0, 0.5, 1.0, 0.5]  # "3" excluded, the classifier "4" not
    assert rows[2]["note"] == "excluded by '3'" and "divisible" in rows[0]["note"]
    plain = summarize(model, "2:4", input_size=(3, 4, 4))["totals"]
    lbc.sparsify(model, method="lbc", pattern="2:4", t_f=1)
    again = summarize(model, "2:4", input_size=(3, 4, 4))
    assert [r["density"] for r in again["rows"]] == [1.0, 0.5, 0.5, 1.0]  # defaults: the classifier dense
    assert again["totals"] == plain  # LBC's scores are not the model's parameters


def test_resnet50_1_16_matches_table_4():
    totals = summarize(torchvision.models.resnet50(), "1:16")["totals"]
    assert round(totals["params_nonzero"] / 1e6, 2) == 3.52  # Table 4: LBC 1:16, 3.52M parameters
    assert abs(totals["flops_dense"] / 4.09e9 - 1) < 0.01  # torchvision's 4.09 GFLOPS (MACs) for ResNet-50
    assert totals["flops_sparse"] < totals["flops_dense"] / 8

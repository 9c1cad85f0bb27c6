"""``lbc.sparsify`` checks its keywords against each method's options dataclass, as the config does."""

from __future__ import annotations

import pytest
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.options import OPTIONS, check_options, option_names


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize(
    "method, options, key",
    [
        ("lbc", {"t_f": "soon"}, "sparsity.t_f"),
        ("lbc", {"t_f": 4, "t_i": 5}, "sparsity.t_f"),
        ("lbc", {"t_f": 4, "exponent": 2.5}, "sparsity.exponent"),
        ("lbc", {"t_f": 4, "rounding": "up"}, "sparsity.rounding"),
        ("lbc", {"t_f": 4, "score_weight_decay": -1}, "sparsity.score_weight_decay"),
        ("lbc", {}, "sparsity.t_f"),
        ("lbc", {"t_f": 4, "common": 1}, "sparsity.common"),
        ("srste", {"lambda_w": -1}, "sparsity.lambda_w"),
        ("asp", {"dense_epochs": 1.5}, "sparsity.dense_epochs"),
        ("asp", {"strict": "no"}, "sparsity.strict"),
        ("dense", {"pattern": "4:4"}, "sparsity.pattern"),
        ("dense", {"exclude": 3}, "sparsity.exclude"),
        ("nope", {}, "sparsity.method"),
        ("lbc", {"t_f": 4, "exponent": 10**30}, "sparsity.exponent"),
        ("lbc", {"t_f": float("inf")}, "sparsity.t_f"),
        ("lbc", {"t_f": 4, "pattern": None}, "sparsity.pattern"),
        (["lbc"], {}, "sparsity.method"),
    ],
)
def test_bad_keywords_are_one_line_config_errors(method, options, key):
    with pytest.raises(ConfigError) as info:
        lbc.sparsify(model(), method=method, **options)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_model_that_is_not_a_module_is_one_line():
    with pytest.raises(ConfigError, match="model must be a torch.nn.Module, not str"):
        lbc.sparsify("resnet50", method="lbc", t_f=4)


def test_a_string_exclude_is_one_glob():
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    sp = lbc.sparsify(net, method="srste", exclude="1")  # not the globs "1" char by char: the same here
    assert sorted(sp.layers) == ["0", "2"]
    sp.detach()
    sp = lbc.sparsify(net, method="srste", exclude="[12]")  # one fnmatch glob, not "[", "1", "2", "]"
    assert sorted(sp.layers) == ["0"]


def test_defaults_are_filled_in_and_method_is_not_passed_on():
    checked = check_options("lbc", {"t_f": 10})
    assert checked["t_i"] == 0.0 and checked["exponent"] == 3 and checked["rounding"] == "paper"
    assert "method" not in checked and set(checked) == set(option_names("lbc")) - {"method"}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_every_registered_method_has_options(method):
    assert method in lbc.METHODS and option_names(method)[0] == "method"

"""``lbc.sparsify`` checks its keywords against each method's options dataclass, as the config does; a
method is declared once (``@METHODS.register(options=...)``) and its constructor takes the checked object."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity import METHODS, SparsityMethod, SparsityOptions
from lbc.sparsity.lbc import LBCOptions
from lbc.sparsity.options import check_options


def plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))


def option_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS.get(method).Options)]


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


def test_defaults_are_filled_in_and_the_constructor_gets_the_checked_object():
    checked = check_options(LBCOptions, "lbc", {"t_f": 10})
    assert isinstance(checked, LBCOptions) and checked.method == "lbc"
    assert checked.t_i == 0.0 and checked.exponent == 3 and checked.rounding == "paper" and checked.freeze_scores
    sp = lbc.sparsify(plain(), method="lbc", t_f=10)
    assert sp.options == checked


@pytest.mark.parametrize("method", METHODS.names())
def test_every_registered_method_is_declared_once(method):
    """The name is the options dataclass's ``method`` default; the class's ``name`` and the config schema follow it."""
    cls = METHODS.get(method)
    assert option_names(method)[0] == "method" and cls.Options.__dataclass_fields__["method"].default == method
    assert cls.name == method and "    name = " not in inspect.getsource(cls)  # set by the registration only
    assert METHODS.schemas()[method] is cls.Options
    params = list(inspect.signature(cls.__init__).parameters)
    assert params == ["self", "model", "options", "input_size"]  # the checked object, no keyword copies


def test_the_config_schemas_are_the_registry_s():
    from lbc.config.schema import SCHEMAS

    assert SCHEMAS["sparsity"] == METHODS.schemas()
    assert sorted(SCHEMAS["sparsity"]) == ["asp", "dense", "lbc", "magnitude", "sparsegpt", "srste", "wanda"]


def test_each_rule_is_checked_once_in_the_options():
    """The constructor checks nothing: a value the options refuse is refused before a method is built, and the
    LBC exponent's range (1..16) is the options' one rule."""
    with pytest.raises(ConfigError, match=r"sparsity.exponent=17 is not allowed; use an integer from 1 to 16"):
        lbc.sparsify(plain(), method="lbc", t_f=4, exponent=17)
    assert lbc.sparsify(plain(), method="lbc", t_f=4, exponent=16).exponent == 16
    with pytest.raises(ConfigError, match=r"^sparsity.rounding='up' is not allowed; choose from: paper, released$"):
        LBCOptions(t_f=4, rounding="up")
    with pytest.raises(ConfigError, match="removal=released"):  # t_i = t_f = 0 (paper removal): an options rule too
        LBCOptions(t_i=0, t_f=0)


def test_register_needs_options_or_a_name():
    with pytest.raises(TypeError, match="METHODS.register"):
        METHODS.register()
    with pytest.raises(TypeError, match="METHODS.register"):
        METHODS.register("x", options=LBCOptions)
    with pytest.raises(KeyError, match="already registered"):
        METHODS.register(options=LBCOptions)(type("Again", (SparsityMethod,), {}))


class _Halve(nn.Module):
    """A user's parametrisation: keep the first half of every group of M (a fixed N:M mask)."""

    def __init__(self, weight: torch.Tensor, m: int) -> None:
        super().__init__()
        keep = torch.arange(weight.shape[1]) % m < m // 2
        self.register_buffer("mask", keep.expand_as(weight[:, :, 0, 0] if weight.dim() == 4 else weight).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask if weight.dim() == 2 else self.mask[:, :, None, None]
        return weight * mask


@pytest.fixture
def user_method():
    """A method a user registers by name, without an options dataclass: it takes the common options."""

    @METHODS.register("halve")
    class Halve(SparsityMethod):
        def parametrization(self, name, module):
            return _Halve(module.weight, self.pattern.m)

    try:
        yield Halve
    finally:
        METHODS._entries.pop("halve")


def test_a_method_registered_without_options_takes_the_common_ones(user_method):
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    sp = lbc.sparsify(net, method="halve", pattern="2:4", exclude=["0"])
    assert isinstance(sp, user_method) and sp.name == "halve" and sp.Options is SparsityOptions
    assert sp.options == SparsityOptions(method="halve", pattern="2:4", exclude=["0"])
    assert sorted(sp.layers) == ["1", "2"] and sp.is_exact_nm()
    with pytest.raises(ConfigError, match=r"sparsity.t_f is not an option of method 'halve'; "
                                          r"allowed: exclude, pattern, strict"):
        lbc.sparsify(nn.Linear(8, 4), method="halve", t_f=2)
    assert "halve" not in METHODS.schemas()  # no dataclass of its own: no config schema

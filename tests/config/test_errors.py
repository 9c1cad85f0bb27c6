"""Each kind of Hydra/OmegaConf error becomes its one line, built from the exception's attributes."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hydra.conf import HydraConf
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    ConfigTypeError,
    InterpolationResolutionError,
    ValidationError,
)

from lbc.config import SCHEMAS, LoaderConfig, as_config_error, validate
from lbc.errors import ConfigError
from tests.helpers import CONFIGS, ROOT, compose_config


def composing(overrides: list[str], kind: type[Exception]) -> Exception:
    """The exception Hydra raises composing ``overrides``, checked to be of ``kind`` (or to wrap one)."""
    with pytest.raises(Exception) as info:
        validate(compose_config(overrides))
    err = info.value
    assert isinstance(err, kind) or isinstance(err.__cause__, kind), (type(err), type(err.__cause__))
    return err


def line(err: Exception, overrides: list[str] = ()) -> str:
    text = str(as_config_error(err, overrides))
    assert "\n" not in text, text
    return text


def fields(schema: type) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(schema)))


def test_missing_group_option_lists_the_group_without_its_schema_entries():
    err = composing(["model=nope"], MissingConfigException)
    shipped = ", ".join(sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
    assert line(err) == f"model=nope is not a known option of the model group; choose from: {shipped}"


def test_missing_option_of_a_nested_group_or_a_nested_option_names_the_group_of_the_override():
    err = composing(["hydra/launcher=nope"], MissingConfigException)
    assert line(err, ["hydra/launcher=nope"]) == (
        "hydra/launcher=nope is not a known option of the hydra/launcher group; choose from: basic")
    nested = MissingConfigException("", missing_cfg_file="experiment/small/nope", options=["base_x", "a", "small/b"])
    assert line(nested) == "experiment=small/nope is not a known option of the experiment group; choose from: a, small/b"
    primary = MissingConfigException("Cannot find primary config 'nope'.\nmore", missing_cfg_file="nope")
    assert line(primary) == "Cannot find primary config 'nope'."


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lr=abc"], "optim.lr='abc' is not allowed; use a number"),
    (["seed=abc"], "seed='abc' is not allowed; use an integer"),
    (["sparsity.exponent=2.5"], "sparsity.exponent=2.5 is not allowed; use an integer"),
    (["trainer.compile=maybe"], "trainer.compile='maybe' is not allowed; use true or false"),
    (["data.loader.batch_size=abc"], "data.loader.batch_size='abc' is not allowed; use an integer or null"),
    (["optim=adamw", "optim.betas=abc"], "optim.betas='abc' is not allowed; use a list of numbers"),
    (["optim=adamw", "optim.betas=[a,b]"], "optim.betas[0]='a' is not allowed; use a number"),
    (["model.extra=3"], "model.extra=3 is not allowed; use a mapping {key: value, ...}"),
    (["data.loader=3"], f"data.loader=3 is not allowed; use a mapping of "
                        f"{', '.join(f.name for f in dataclasses.fields(LoaderConfig))}"),
    (["optim.lr=null"], "optim.lr=None is not allowed; use a number"),
])
def test_a_wrong_type_names_the_value_and_the_type_the_schema_declares(overrides, expected):
    assert line(composing(overrides, ValidationError)) == expected


@pytest.mark.parametrize("overrides, key, schema", [
    (["sparsity.comon=1"], "sparsity.comon", SCHEMAS["sparsity"]["lbc"]),
    (["data.loader.nope=1"], "data.loader.nope", LoaderConfig),
    (["hydra.nope=1"], "hydra.nope", HydraConf),
])
def test_an_unknown_key_lists_the_fields_of_its_schema(overrides, key, schema):
    err = composing(overrides, ConfigAttributeError)
    assert line(err) == f"{key} is not a known key; allowed: {fields(schema)}"


def test_an_unknown_key_of_a_plain_mapping_lists_its_keys_and_a_key_error_is_the_same():
    cfg = OmegaConf.create({"block": {"depth": 1, "width": 2}})
    OmegaConf.set_struct(cfg, True)
    with pytest.raises(ConfigAttributeError) as attr:
        cfg.block.dpth  # noqa: B018
    with pytest.raises(ConfigKeyError) as item:
        cfg.block["dpth"]  # noqa: B018
    assert line(attr.value) == line(item.value) == "block.dpth is not a known key; allowed: depth, width"


def test_a_type_error_names_the_key_and_says_what_omegaconf_refused():
    err = composing(["~optim.lr"], ConfigTypeError)
    assert line(err) == "optim.lr: SGDConfig (DictConfig) does not support deletion"


def test_an_interpolation_that_does_not_resolve_names_the_key():
    assert line(composing(["optim.lr=${nope}"], InterpolationResolutionError)) == (
        "optim.lr: Interpolation key 'nope' not found")
    # our resolver's own ConfigError is the reason, without OmegaConf's wrapping sentence
    assert line(composing(["sparsity.t_f=${div:1,0}"], InterpolationResolutionError)) == (
        "sparsity.t_f: ${div:1,0} divides by zero")


def test_an_override_that_does_not_parse_is_named():
    err = composing(["optim.lr=["], OverrideParseException)
    assert line(err) == "optim.lr=[ cannot be parsed: no viable alternative at input '['"


def test_hydras_own_composition_errors_keep_their_first_sentence():
    err = composing(["+optim.lr=1"], ConfigCompositionException)
    assert err.__cause__ is None
    assert line(err) == "Could not append to config. An item is already at 'optim.lr'."


def test_our_config_error_passes_through_unchanged():
    err = ConfigError("optim.lr=-1.0 is not allowed; use a positive number")
    assert as_config_error(err) is err


# --- the config error path reads exceptions, not what Hydra prints ------------------------------------
ERROR_PATH = ["lbc/config/errors.py", "lbc/config/validate.py", "lbc/cli/train.py"]
PRINTED = ["Could not find", "Available options in", "full_key:", "object_type=", "could not be converted",
           "not in struct", "Error merging override", "Set the environment variable"]


def test_no_module_swaps_stderr_or_parses_hydras_printed_text():
    for path in sorted((ROOT / "lbc").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        assert not re.search(r"sys\.stderr\s*=(?!=)|redirect_stderr", text), f"{rel} swaps sys.stderr"
        for fragment in PRINTED:
            assert fragment not in text, f"{rel} matches Hydra/OmegaConf's message text {fragment!r}"
    for rel in ERROR_PATH:
        text = (ROOT / rel).read_text()
        assert not re.search(r"^\s*(import re\b|from re import)", text, re.M), f"{rel} uses regexes"

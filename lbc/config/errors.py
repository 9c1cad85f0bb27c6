"""Configuration errors as one line naming the key and what is allowed, built from the attributes of Hydra's
and OmegaConf's typed exceptions (never from their printed text)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from lbc.errors import ConfigError, first_line

_SCALARS = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
            float: ("a number", "numbers"), str: ("a string", "strings")}


def as_config_error(err: Exception, overrides: Sequence[str] = ()) -> ConfigError:
    """``err`` (Hydra's or OmegaConf's exception, or ours) as our one-line ConfigError.

    ``overrides`` (the command line's) name the group of a missing option exactly (``hydra/launcher=x``).
    """
    if isinstance(err, ConfigError):
        return err
    if isinstance(err, MissingConfigException):
        return ConfigError(_missing_option(err, overrides))
    if isinstance(err, OverrideParseException):
        return ConfigError(f"{err.override} cannot be parsed: {first_line(err)}")
    if isinstance(err, ConfigCompositionException) and isinstance(err.__cause__, OmegaConfBaseException):
        return as_config_error(err.__cause__)
    if isinstance(err, OmegaConfBaseException):
        return ConfigError(_omegaconf_line(err))
    return ConfigError(first_line(err))  # Hydra's own one-sentence errors ("Could not append to config...")


def _missing_option(err: MissingConfigException, overrides: Sequence[str]) -> str:
    """``model=nope``: the group's options, without the ``base_*`` schema entries registered beside them."""
    if err.options is None:  # the primary config itself (--config-name)
        return first_line(err)
    path = err.missing_cfg_file or ""
    group, _, option = path.partition("/")  # lbc's groups are top-level; an option may be nested (small/x)
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        value = None if override.is_sweep_override() else override.get_value_element_as_str()
        if f"{override.key_or_group}/{value}" == path:  # the override that asked for it: hydra/launcher=x
            group, option = override.key_or_group, value
    options = [o for o in err.options if not o.startswith("base_")]
    choices = f"; choose from: {', '.join(options)}" if options else ""
    return f"{group}={option} is not a known option of the {group} group{choices}"


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    """An unknown key with the allowed ones, a wrong type with the expected one, else OmegaConf's sentence."""
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and isinstance(err.parent_node, DictConfig):
        return f"{err.full_key} is not a known key{_allowed(err)}"
    if isinstance(err, InterpolationResolutionError):
        reason = _own_error(err) or first_line(err)  # a resolver of ours (``${div:1,0}``) says what is wrong
        return f"{err.full_key}: {reason}" if err.full_key else str(reason)
    expected = _expected(err) if isinstance(err, ValidationError) else None
    if expected:
        return f"{err.full_key}={err.value!r} is not allowed; use {expected}"
    return f"{err.full_key}: {first_line(err)}" if err.full_key else first_line(err)


def _allowed(err: OmegaConfBaseException) -> str:
    """``; allowed: <keys>`` of the node the key was looked up in: its schema's fields, or its own keys."""
    if dataclasses.is_dataclass(err.object_type):
        keys = [f.name for f in dataclasses.fields(err.object_type)]
    elif isinstance(err.parent_node, DictConfig):
        keys = [str(k) for k in err.parent_node.keys()]
    else:
        return ""
    return f"; allowed: {', '.join(sorted(keys))}" if keys else ""


def _expected(err: ValidationError) -> str | None:
    """What the schema declares at the failing key (``a number``, ``a list of integers``...), if known."""
    if dataclasses.is_dataclass(err.object_type) and isinstance(err.key, str):
        declared = typing.get_type_hints(err.object_type).get(err.key)
    elif err.object_type is list and err.ref_type is not None:  # an element of a typed list
        declared = next(iter(typing.get_args(_strip_optional(err.ref_type)[0])), None)
    else:
        return None
    return None if declared is None else _describe(declared)


def _describe(declared: Any) -> str:
    """A type annotation in words, as a user writes the value on the command line."""
    declared, optional = _strip_optional(declared)
    origin, args = typing.get_origin(declared) or declared, typing.get_args(declared)
    if declared in _SCALARS:
        words = _SCALARS[declared][0]
    elif origin in (list, tuple):
        element = _SCALARS.get(args[0]) if args else None
        words = f"a list of {element[1]}" if element else "a list"
    elif origin is dict:
        words = "a mapping {key: value, ...}"
    elif dataclasses.is_dataclass(declared):
        words = f"a mapping of {', '.join(f.name for f in dataclasses.fields(declared))}"
    else:
        words = getattr(declared, "__name__", str(declared))
    return f"{words} or null" if optional else words


def _strip_optional(declared: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (it, False)."""
    args = typing.get_args(declared)
    if typing.get_origin(declared) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return declared, False


def _own_error(err: BaseException) -> ConfigError | None:
    """The ConfigError one of our resolvers raised, which OmegaConf chained under its own exception."""
    seen = err.__cause__ or err.__context__
    while seen is not None and not isinstance(seen, ConfigError):
        seen = seen.__cause__ or seen.__context__
    return seen

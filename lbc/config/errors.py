"""Configuration errors as one line naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import re

from omegaconf.errors import OmegaConfBaseException

from lbc.config.classification import AugmentConfig, DataConfig, LoaderConfig, ModelConfig
from lbc.config.schema import SCHEMAS, TrainConfig
from lbc.errors import ConfigError

_SCHEMA_BY_NAME = {
    schema.__name__: schema for options in SCHEMAS.values() for schema in options.values()
} | {schema.__name__: schema for schema in (TrainConfig, LoaderConfig, AugmentConfig, ModelConfig, DataConfig)}


def _allowed_keys(object_type: str | None) -> str:
    schema = _SCHEMA_BY_NAME.get(object_type or "")
    if schema is None:
        return ""
    return "; allowed: " + ", ".join(sorted(f.name for f in dataclasses.fields(schema)))


def _type_hint(message: str) -> str:
    match = re.search(r"could not be converted to (\w+)|is not a valid (\w+)", message)
    if match:
        kind = match.group(1) or match.group(2)
        return {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "bool": "true or false",
                "int": "an integer", "float": "a number"}.get(kind, kind)
    return ""


def one_line(message: str, full_key: str | None = None, object_type: str | None = None) -> str:
    """One line naming the key and what is allowed, from an OmegaConf/Hydra error's text.

    OmegaConf's messages carry ``full_key: ...`` and ``object_type=...`` lines; Hydra's composition
    errors print them under their own first line. Both are folded into one sentence here.
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("full_key:") and not full_key:
            full_key = ln.split(":", 1)[1].strip()
        elif ln.startswith("object_type=") and not object_type:
            object_type = ln.split("=", 1)[1].strip()
    body = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=",
                                                     "Set the environment variable HYDRA_FULL_ERROR"))]
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:  # a group option that does not exist: model=nope
        group, option = missing.groups()
        options = []
        if "Available options in" in message:
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
            options = []
            for ln in lines[start + 1:]:
                if ln.startswith(("Config search path", "Set the environment variable")):
                    break
                if not ln.startswith("base_"):
                    options.append(ln.split()[0])
        return f"{group}={option} is not a known option of the {group} group; choose from: {', '.join(options)}"
    not_in = next((ln for ln in body if re.search(r"Key '([^']+)' (is )?not in", ln)), None)
    if not_in is not None:
        key = full_key or re.search(r"Key '([^']+)'", not_in).group(1)
        return f"{key} is not a known key{_allowed_keys(object_type)}"
    conversion = next((ln for ln in body if "could not be converted" in ln or "Invalid value assigned" in ln
                       or "Non optional field" in ln or "is not a ListConfig" in ln or "is not a valid" in ln), None)
    if conversion is not None and full_key:
        hint = _type_hint(conversion)
        reason = f"use {hint}" if hint else conversion.rstrip(".")
        value = re.search(r"Value '([^']*)'", conversion)
        shown = f"={value.group(1)!r}" if value else ""
        return f"{full_key}{shown} is not allowed; {reason}"
    first = " ".join((body or lines or ["invalid config"])[0].split())
    if full_key and full_key not in first:
        first = f"{full_key}: {first}"
    return first


def as_config_error(err: OmegaConfBaseException) -> ConfigError:
    """An OmegaConf exception as our one-line ConfigError."""
    cause = err.__cause__
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(one_line(str(err), getattr(err, "full_key", None), getattr(err, "object_type_str", None)))

"""Errors raised at the boundary (configs, files): one line that names what is wrong, and the checks
that raise them."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


class DataError(RuntimeError):
    """A data set cannot be used as given (missing path, empty split, ...)."""


class WriteError(DataError):
    """A file could not be written (disk full, quota, read-only file system, permission): a runtime failure,
    one line naming the file and the reason; the previous file of that name is intact (lbc.io.atomic_write).

    A DataError so that every command that prints a DataError as one line prints this one too; a command
    that tells runtime failures from bad input exits 1 on it (catch it before DataError)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line ConfigError ``<key>=<value> is not allowed; <allowed>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; {allowed}")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (a config value that may be used as a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(err).__name__

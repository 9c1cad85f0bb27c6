"""The numeric resolvers the configs use: ``${div:a,b}``, ``${mul:a,b}`` and ``${sub:a,b}``."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import OmegaConf

from lbc.errors import ConfigError


# --- resolvers --------------------------------------------------------------------------------
def _number(x: Any) -> int | float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise ConfigError(f"resolver argument {x!r} is not a number") from None
    return x


def div(a: Any, b: Any) -> int | float:
    """``${div:a,b}``: a / b; an int when both are ints and b divides a (epochs stay ints)."""
    a, b = _number(a), _number(b)
    if b == 0:
        raise ConfigError(f"${{div:{a},{b}}} divides by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    return a / b


def mul(a: Any, b: Any) -> int | float:
    """``${mul:a,b}``: a * b."""
    return _number(a) * _number(b)


def sub(a: Any, b: Any) -> int | float:
    """``${sub:a,b}``: a - b."""
    return _number(a) - _number(b)


def smaller(a: Any, b: Any) -> int | float:
    """``${min:a,b}``: the smaller of a and b (a default that must stay below another value)."""
    return min(_number(a), _number(b))


def floor(x: Any) -> int:
    """``${floor:x}``: the largest whole number <= x (a whole epoch count from a fraction of the epochs)."""
    return math.floor(_number(x))


def register_resolvers() -> None:
    """Register ``div``, ``mul``, ``sub``, ``min`` and ``floor`` once (idempotent; importing this module does it)."""
    for name, fn in (("div", div), ("mul", mul), ("sub", sub), ("min", smaller), ("floor", floor)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

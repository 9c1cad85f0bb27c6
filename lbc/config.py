"""Validation of the composed training config, and the OmegaConf resolvers the configs use.

Importing this module registers ``${div:a,b}`` and ``${mul:a,b}`` (numeric), so that e.g. a
sparsity config can say ``t_f: ${div:${schedule.epochs},2}``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lbc.errors import ConfigError

__all__ = ["div", "mul", "register_resolvers", "validate"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine",)
AMP_DTYPES = ("bf16", "fp16")


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


def register_resolvers() -> None:
    """Register ``div`` and ``mul`` once (idempotent; importing this module does it)."""
    for name, fn in (("div", div), ("mul", mul)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=_ABSENT)
    if value is _ABSENT:
        raise ConfigError(f"{key} is missing from the config")
    return value


def _positive(cfg: DictConfig, key: str, *, integer: bool = False, zero_ok: bool = False) -> Any:
    value = _get(cfg, key)
    kind = "integer" if integer else "number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; use a {'non-negative' if zero_ok else 'positive'} {kind}")
    return value


def _choice(cfg: DictConfig, key: str, allowed: tuple, *, optional: bool = False) -> Any:
    value = _get(cfg, key)
    if optional and value in (None, "none"):
        return None
    if value not in allowed:
        extra = ", null" if optional else ""
        raise ConfigError(f"{key}={value!r} is not allowed; choose from: {', '.join(map(str, allowed))}{extra}")
    return value


def validate(cfg: DictConfig) -> None:
    """Check the values the engine uses; raise a one-line ConfigError naming the key otherwise.

    Model, data and sparsity values are checked by their own builders (registries), which run
    right after this at start-up.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: pass {missing[0]}=... on the command line")
    for key in ("model.name", "data.name", "sparsity.method"):
        if not isinstance(_get(cfg, key), str):
            raise ConfigError(f"{key} must be a name (string)")
    if not isinstance(_get(cfg, "seed"), int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"seed={cfg.seed!r} is not allowed; use an integer")

    # optim
    _choice(cfg, "optim.name", OPTIMIZERS)
    _positive(cfg, "optim.lr")
    _positive(cfg, "optim.weight_decay", zero_ok=True)
    if cfg.optim.name == "sgd":
        momentum = _positive(cfg, "optim.momentum", zero_ok=True)
        if momentum >= 1:
            raise ConfigError(f"optim.momentum={momentum!r} is not allowed; use 0 <= momentum < 1")
        if not isinstance(_get(cfg, "optim.nesterov"), bool):
            raise ConfigError("optim.nesterov must be true or false")
        if cfg.optim.nesterov and momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    else:
        betas = _get(cfg, "optim.betas")
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={list(betas)!r} is not allowed; use two numbers in [0, 1)")
        _positive(cfg, "optim.eps")

    # schedule
    _choice(cfg, "schedule.name", SCHEDULES)
    epochs = _positive(cfg, "schedule.epochs", integer=True)
    warmup = _positive(cfg, "schedule.warmup_epochs", zero_ok=True)
    if warmup >= epochs:
        raise ConfigError(f"schedule.warmup_epochs={warmup!r} is not allowed; use 0 <= warmup_epochs < schedule.epochs={epochs}")
    _positive(cfg, "schedule.min_lr", zero_ok=True)
    _positive(cfg, "schedule.warmup_lr", zero_ok=True)

    # trainer
    device = _get(cfg, "trainer.device")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"trainer.device={device!r} is not allowed; choose from: auto, cpu, cuda, cuda:N")
    _choice(cfg, "trainer.amp", AMP_DTYPES, optional=True)
    for key in ("trainer.channels_last", "trainer.compile", "trainer.ema", "trainer.progress",
                "trainer.find_unused_parameters", "trainer.dump_params"):
        if not isinstance(_get(cfg, key), bool):
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed; use true or false")
    ema_decay = _positive(cfg, "trainer.ema_decay")
    if ema_decay >= 1:
        raise ConfigError(f"trainer.ema_decay={ema_decay!r} is not allowed; use 0 < decay < 1")
    _positive(cfg, "trainer.log_interval", integer=True)
    _positive(cfg, "trainer.ckpt_interval", integer=True)
    for key in ("trainer.max_steps_per_epoch", "trainer.max_eval_steps"):
        if _get(cfg, key) is not None:
            _positive(cfg, key, integer=True)
    if _get(cfg, "trainer.clip_grad") is not None:
        _positive(cfg, "trainer.clip_grad")
    resume = _get(cfg, "trainer.resume")
    if resume is not None and not isinstance(resume, str):
        raise ConfigError(f"trainer.resume={resume!r} is not allowed; use a checkpoint path or null")
    if not isinstance(_get(cfg, "run_dir"), str) or not cfg.run_dir:
        raise ConfigError("run_dir must be a directory path")

"""The one resume check of every task: the saved config against this run's, by each key's rule.

The rules are declared beside the schema fields (:mod:`lbc.config.resume`); this module only
compares. The saved config is read through today's schemas: a key the saved config lacks takes its
schema default there (a run written before the key existed ran with that behaviour), so a key added
to a schema later never makes an old run unresumable, and no list of added keys is kept anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lbc.config.resume import IGNORE, NO_DEFAULT, REFUSE, flatten_keys, rule_of, schema_default
from lbc.errors import ConfigError

__all__ = ["changed_keys", "check_epoch", "check_resume"]

_ABSENT: Any = object()


def _where(key: str, path: str | Path | None) -> str:
    return f"{key}={str(path)!r}" if path is not None else key


def changed_keys(saved: Mapping[str, Any], cfg: DictConfig) -> list[str]:
    """Dotted keys whose values differ between the ``saved`` config (a plain container) and this run's
    ``cfg``, in ``cfg``'s order, then keys only the saved one has; ``ignore`` keys are skipped and a key
    the saved config lacks is compared with its schema default."""
    current = flatten_keys(OmegaConf.to_container(cfg, resolve=True))
    old = {k: v for k, v in flatten_keys(saved).items()  # an emptied group is no key of its own
           if not (v == {} and any(c.startswith(f"{k}.") for c in current))}
    names = list(current) + [k for k in old if k not in current]

    def before(k: str) -> Any:
        if k in old:
            return old[k]
        default = schema_default(cfg, k)
        return _ABSENT if default is NO_DEFAULT else default

    return [k for k in names if rule_of(cfg, k) != IGNORE and before(k) != current.get(k, _ABSENT)]


def _describe(names: list[str], saved: Mapping[str, Any] | None, cfg: DictConfig | None) -> str:
    old = flatten_keys(saved or {})
    new = flatten_keys(OmegaConf.to_container(cfg, resolve=True)) if cfg is not None else {}

    def one(k: str) -> str:
        if saved is None or cfg is None:
            return k
        fmt = lambda v: "(absent)" if v is _ABSENT else repr(v)  # noqa: E731
        was = old.get(k, _ABSENT)
        if was is _ABSENT and schema_default(cfg, k) is not NO_DEFAULT:
            was = schema_default(cfg, k)
        return f"{k} ({fmt(was)} -> {fmt(new.get(k, _ABSENT))})"

    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(one(k) for k in names[:3]) + more


def check_epoch(epoch: int, epochs: int, changed: list[str], *, key: str = "trainer.resume",
                path: str | Path | None = None, unit: str = "epoch") -> bool:
    """Whether a checkpoint after ``epoch`` epochs can continue a run of ``epochs``; True if it has finished.

    A finished checkpoint (``epoch == epochs``) is fine only with the same config (nothing is left
    to train with a changed one); ``epoch > epochs`` is refused. ``unit="step"``: both count optimizer
    steps (``schedule.steps``, the language-model task).
    """
    where = _where(key, path)
    if epoch > epochs:
        raise ConfigError(f"{where} is at {unit} {epoch}, past schedule.{unit}s={epochs}; "
                          "start a new run_dir or put the old values back")
    if epoch == epochs and changed:
        raise ConfigError(f"{where} has already finished all {epochs} {unit}s; the changed {_describe(changed, None, None)} "
                          "would not be used: start a new run_dir or put the old values back")
    return epoch == epochs


def check_resume(saved: Mapping[str, Any], cfg: DictConfig, *, epoch: int | None = None,
                 key: str = "trainer.resume", path: str | Path | None = None) -> list[str]:
    """Refuse in one line a config change a resume cannot honour (a ``refuse`` key), and a finished or
    overrun checkpoint (``epoch``, when given, against ``schedule.epochs``); returns the changed keys a
    resume honours (``allow``), for the start-up log."""
    changed = changed_keys(saved, cfg)
    refused = [k for k in changed if rule_of(cfg, k) == REFUSE]
    if refused:
        raise ConfigError(f"{_where(key, path)} was written with another config: changed "
                          f"{_describe(refused, saved, cfg)} cannot be honoured when resuming; "
                          "start a new run_dir or put the old values back")
    epochs = OmegaConf.select(cfg, "schedule.epochs")
    if epoch is not None and epochs is not None:
        check_epoch(int(epoch), int(epochs), changed, key=key, path=path)
    return changed

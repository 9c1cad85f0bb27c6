"""Each config key's resume rule, declared beside its schema field, and the lookups that read it.

A run that resumes from a checkpoint (or a run dir) compares the saved config with its own
(:func:`lbc.run.resume.check_resume`). What a changed key means is the key's rule:

- ``ignore``: it does not change what is trained (where the run writes, how it reports, where it
  runs): not compared at all;
- ``allow``: the resumed run honours the new value (EMA, AMP, gradient clipping, evaluation cadence):
  compared, logged as a change, accepted;
- ``refuse``: the checkpoint holds state the new value would contradict (the optimizer's lr, the
  scheduler's epochs, the masks, the data order): a change is one ConfigError line.

A field says its rule with ``on_resume(rule, default=...)`` (dataclass field metadata); a field
without one inherits the rule of the field above it, up to :class:`lbc.config.schema.TrainConfig`,
whose group fields set each group's rule (``trainer``: allow; ``model``, ``data``, ``sparsity``,
``optim``, ``schedule``, ``seed``: refuse; ``task``, ``run_dir``: ignore). A key the schemas do not
know inherits the same way; a key that is new since a run was saved takes its schema default there
(:func:`schema_default`), so adding a field with a default never needs an edit anywhere else to keep
old runs resumable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

IGNORE, ALLOW, REFUSE = "ignore", "allow", "refuse"
RULES = (IGNORE, ALLOW, REFUSE)
METADATA_KEY = "resume"
NO_DEFAULT: Any = object()  # schema_default's answer for a key without a default (or unknown to the schemas)

__all__ = ["ALLOW", "IGNORE", "NO_DEFAULT", "REFUSE", "flatten_keys", "on_resume", "rule_of", "schema_default"]


def on_resume(rule: str, **field_options: Any) -> Any:
    """A dataclass field whose resume rule is ``rule`` (``default=`` / ``default_factory=`` as for ``field``)."""
    if rule not in RULES:
        raise ValueError(f"resume rule {rule!r}: choose from {', '.join(RULES)}")
    return dataclasses.field(metadata={METADATA_KEY: rule}, **field_options)


def _fields(schema: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}


def _walk(cfg: DictConfig, dotted: str) -> list[dataclasses.Field | None]:
    """The schema field of every part of ``dotted`` (None where no schema knows it).

    The schemas come from the composed config itself (``OmegaConf.get_type`` of each node: the group
    options' dataclasses), so a group's rules are those of the option this run uses.
    """
    path: list[dataclasses.Field | None] = []
    node: Any = cfg
    for part in dotted.split("."):
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        path.append(_fields(schema).get(part))
        child = node._get_node(part) if isinstance(node, DictConfig) and part in node else None
        node = child if isinstance(child, DictConfig) else None
    return path


def rule_of(cfg: DictConfig, dotted: str) -> str:
    """The resume rule of the dotted key ``dotted`` in this run's config ``cfg`` (innermost declared rule wins)."""
    rule = REFUSE  # a top-level key no schema declares: its change cannot be honoured
    for field in _walk(cfg, dotted):
        if field is not None and METADATA_KEY in field.metadata:
            rule = field.metadata[METADATA_KEY]
    return rule


def schema_default(cfg: DictConfig, dotted: str) -> Any:
    """The default of ``dotted``'s schema field (what a run saved before the field existed ran with),
    as a plain value; :data:`NO_DEFAULT` if the field has none or no schema declares the key."""
    path = _walk(cfg, dotted)
    field = path[-1] if path else None
    if field is None:
        return NO_DEFAULT
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return NO_DEFAULT
    if dataclasses.is_dataclass(value):
        return NO_DEFAULT  # a whole group: its leaves are compared one by one
    if value == "???":  # OmegaConf's MISSING: a required key has no default
        return NO_DEFAULT
    return value


def flatten_keys(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; a leaf is anything but a non-empty mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out |= flatten_keys(v, f"{name}.")
        else:
            out[name] = v
    return out

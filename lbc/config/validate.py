"""The check of a composed config: each group as its typed dataclass, range checks, cross-group checks."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lbc.config.errors import as_config_error
from lbc.config.schema import SCHEMAS
from lbc.errors import ConfigError, require

# The largest seed: torch.manual_seed takes at most 2**64-1 and the runs add small offsets to it (the rank,
# the epoch: DistributedSampler, the workers); numpy's generators refuse negative seeds. 2**63-1 also fits
# every int64 the seed passes through (checkpoints, TensorBoard, numpy).
SEED_MAX = 2**63 - 1


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Refuse keys the schema does not have (``+group.key=...`` adds one past the struct check)."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in names:
            raise ConfigError(f"{prefix}.{key} is not a known key; allowed: {', '.join(sorted(names))}")
        nested = OmegaConf.get_type(node._get_node(key))  # a nested schema (data.loader) keeps its type
        if dataclasses.is_dataclass(nested) and OmegaConf.is_dict(node._get_node(key)):
            _check_keys(node[key], nested, f"{prefix}.{key}")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check the composed config; return each group as its typed dataclass object.

    Types and unknown keys were checked while composing (the schemas); this runs the range checks
    next to the fields (``__post_init__``) and the few that span groups. Any problem is one
    ConfigError line naming the key.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: pass {missing[0]}=... on the command line")
    typed: dict[str, Any] = {}
    try:
        for group in SCHEMAS:
            if group not in cfg:  # a config without this group (a user's own primary config)
                continue
            node = cfg[group]
            schema = OmegaConf.get_type(node)
            if schema is dict or schema is None:  # a user's own option without a schema: as it is
                typed[group] = node
                continue
            _check_keys(node, schema, group)
            typed[group] = OmegaConf.to_object(node)
        seed, run_dir = cfg.seed, cfg.run_dir
    except OmegaConfBaseException as err:
        raise as_config_error(err) from None
    require(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "use an integer")
    require(0 <= seed <= SEED_MAX, "seed", seed, f"use an integer from 0 to 2**63-1 ({SEED_MAX})")
    require(isinstance(run_dir, str) and bool(run_dir), "run_dir", run_dir, "use a directory path")
    optim, schedule = typed.get("optim"), typed.get("schedule")
    if hasattr(schedule, "min_lr") and hasattr(optim, "lr"):  # a schedule that decays to a floor (cosine)
        require(schedule.min_lr <= optim.lr, "schedule.min_lr", schedule.min_lr, f"use at most optim.lr={optim.lr}")
    return typed

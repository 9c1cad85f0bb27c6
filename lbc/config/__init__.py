"""The training config: schemas by task (Hydra structured configs), the check of a composed config,
its one-line errors and the resolvers it uses.

- :mod:`lbc.config.classification`, :mod:`lbc.config.detection`, :mod:`lbc.config.lm`: each task's group schemas;
- :mod:`lbc.config.schema`: the primary config, :data:`SCHEMAS` and their registration in Hydra's
  ConfigStore (``<group>/base_<option>``);
- :mod:`lbc.config.validate`: :func:`validate` (typed groups, range and cross-group checks);
- :mod:`lbc.config.errors`: configuration errors as one line;
- :mod:`lbc.config.resolvers`: ``${div:a,b}``, ``${mul:a,b}``, ``${sub:a,b}``.

Importing the package registers the resolvers and the schemas.
"""

from __future__ import annotations

from lbc.batching import per_process_batch, scaled_lr
from lbc.config.classification import *  # noqa: F403
from lbc.config.detection import *  # noqa: F403
from lbc.config.errors import as_config_error
from lbc.config.lm import *  # noqa: F403
from lbc.config.resolvers import div, mul, register_resolvers, sub
from lbc.config.schema import SCHEMAS, TaskConfig, TrainConfig, register_schemas
from lbc.config.validate import validate

register_resolvers()
register_schemas()

__all__ = ["SCHEMAS", "TaskConfig", "TrainConfig", "as_config_error", "div", "mul", "per_process_batch",
           "register_resolvers", "register_schemas", "scaled_lr", "sub", "validate"]

"""Train a model with N:M sparsity as the Hydra config says: ``python tools/train.py [key=value ...]``.

A wrong value stops here with one line ``error: <key> ...`` on stderr and exit status 2.
Under ``torchrun --nproc_per_node=K`` it trains with DDP.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lbc import config as _config  # noqa: E402  (registers the div/mul resolvers before composing)
from lbc.engine import distributed  # noqa: E402
from lbc.engine.trainer import run  # noqa: E402
from lbc.errors import ConfigError, DataError  # noqa: E402

CONFIGS = str(Path(__file__).resolve().parents[1] / "lbc" / "configs")


@hydra.main(config_path=CONFIGS, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # The directory Hydra made for this job (a sweep gives each job its own); resolved once here.
    out = HydraConfig.get().runtime.output_dir
    with open_dict(cfg):
        cfg.run_dir = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    try:
        run(cfg)
    except (ConfigError, DataError, OmegaConfBaseException) as e:
        message = " ".join(str(e).split("\n")[0].split())
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FloatingPointError as e:  # diverged: the run dir keeps the last good checkpoint
        print(f"error: {e} (lower optim.lr or enable trainer.clip_grad; the last good checkpoint "
              f"is in {cfg.run_dir})", file=sys.stderr, flush=True)
        sys.exit(1)
    distributed.shutdown()  # under torchrun: leave the group and os._exit(0) (gloo can abort at exit)


if __name__ == "__main__":
    _ = _config
    main()

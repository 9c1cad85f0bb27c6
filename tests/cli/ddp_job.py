"""A training job for ``torchrun`` in the tests: ``build`` + ``fit`` as lbc-train does, then every rank
saves its final parameters to ``<run_dir>/rank<R>_params.pt`` so the test can compare the ranks.

    torchrun --nproc_per_node=2 tests/cli/ddp_job.py key=value ...
"""

import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tests package (not installed)

from lbc.engine import trainer  # noqa: E402
from lbc.run import distributed  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    cfg = compose_config(sys.argv[1:])
    training = trainer.build(cfg)
    trainer.fit(training)
    state = {k: v.detach().cpu() for k, v in training.model.state_dict().items()}
    torch.save(state, Path(cfg.run_dir) / f"rank{distributed.rank()}_params.pt")
    distributed.shutdown()

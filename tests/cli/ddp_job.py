"""A training job for ``torchrun`` in the tests: ``build`` + ``fit`` as lbc-train does, then every rank
saves its final parameters to ``<run_dir>/rank<R>_params.pt`` so the test can compare the ranks.

    torchrun --nproc_per_node=2 tests/cli/ddp_job.py key=value ...

``DDP_JOB_SIGNAL=<epoch>:<step>:<rank>:<SIGNAME>``: that rank sends itself the signal right after that
optimizer step (epoch 0-based, step 1-based) of the epoch, as a scheduler or a user would; a graceful
stop exits with its status (143 for SIGTERM), as lbc-train does.
"""

import logging
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tests package (not installed)

from lbc.engine import trainer  # noqa: E402
from lbc.run import distributed  # noqa: E402
from lbc.run.signals import Stopped, exit_process  # noqa: E402
from tests.helpers import compose_config  # noqa: E402


def signal_at(epoch: int, step: int, rank: int, name: str) -> None:
    real = trainer.train_one_epoch

    def train_one_epoch(*args, epoch: int, after_step, **kwargs):
        def hook(state):
            after_step(state)
            if (epoch, state.step, distributed.rank()) == (wanted, step, rank):
                os.kill(os.getpid(), getattr(signal, name))

        return real(*args, epoch=epoch, after_step=hook, **kwargs)

    wanted = epoch
    trainer.train_one_epoch = train_one_epoch


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if os.environ.get("DDP_JOB_SIGNAL"):
        e, s, r, name = os.environ["DDP_JOB_SIGNAL"].split(":")
        signal_at(int(e), int(s), int(r), name)
    cfg = compose_config(sys.argv[1:])
    training = trainer.build(cfg)
    try:
        trainer.fit(training)
    except Stopped as stop:
        exit_process(stop.exit_code)
    state = {k: v.detach().cpu() for k, v in training.model.state_dict().items()}
    torch.save(state, Path(cfg.run_dir) / f"rank{distributed.rank()}_params.pt")
    distributed.shutdown()

"""Shared test helpers: compose the Hydra config the way ``lbc-train`` does; tiny overrides for instant runs."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import lbc.config  # noqa: F401  (registers the resolvers and the structured configs)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "lbc" / "configs"
PYTHON = sys.executable

# A few steps of digits on resnet_small: seconds, not minutes.
TINY = [
    "trainer=smoke",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "data.loader.batch_size=16",
    "data.loader.workers=0",
]


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The composed config for ``overrides``, as ``lbc-train`` would get it (without the hydra node)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_cli(*args: str) -> tuple[int, str, str]:
    """``lbc-train args`` in this process (``lbc.cli.train.main(args)``): (exit status, stdout, stderr)."""
    from lbc.cli import train as cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_same_state(a: dict, b: dict) -> None:
    """Two training checkpoints hold the same state: epoch, model, optimizer, schedule, sparsity, RNG."""
    import torch

    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert a["scheduler"] == b["scheduler"] and a["sparsity"] == b["sparsity"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])

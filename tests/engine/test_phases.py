"""Methods with phases (ASP: dense, then fine-tune) get one lr schedule per phase and a hand-off checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import lbc.engine.trainer as trainer
from lbc.engine import checkpoint
from lbc.engine.optim import PhasedScheduler
from lbc.errors import ConfigError
from lbc.sparsity.nm import NMPattern, is_nm


def test_phased_scheduler_restarts_the_cosine_at_each_phase():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = PhasedScheduler(opt, [2, 1], steps_per_epoch=4, warmup_epochs=0, warmup_lr=1e-5, min_lr=0.0)
    lrs = []
    for step in range(12):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[8] == pytest.approx(0.1)  # both phases start at the top
    assert all(a > b for a, b in zip(lrs[:7], lrs[1:8], strict=True))  # phase 1 decays over 8 steps
    assert all(a > b for a, b in zip(lrs[8:11], lrs[9:12], strict=True))  # phase 2 over 4
    assert lrs[4] == pytest.approx(0.05)  # half way through phase 1: cos(pi/2)


@pytest.mark.slow
def test_asp_pipeline_in_one_command_with_hand_off_checkpoint(make_config, tmp_path):
    cfg = make_config("sparsity=asp", "sparsity.dense_epochs=1", "sparsity.finetune_epochs=1")
    result = trainer.run(cfg)
    run_dir = tmp_path / "run"
    dense, last = checkpoint.load(run_dir / "dense.pt"), checkpoint.load(run_dir / "last.pt")
    assert dense["epoch"] == 1 and last["epoch"] == 2
    masks = {k: v for k, v in dense["model"].items() if k.endswith(".mask")}
    assert masks and all(bool(v.all()) for v in masks.values())  # the hand-off is still dense
    assert result["sparsity/exact_nm"] == 1.0
    # the shipped weights: stored weights times masks are exactly 2:4, the pruned ones exactly zero
    pattern = NMPattern(2, 4)
    for key, mask in last["model"].items():
        if key.endswith("parametrizations.weight.0.mask"):
            layer = key.removesuffix("parametrizations.weight.0.mask")
            weight = last["model"][layer + "weight"]
            assert is_nm(weight * mask, pattern) and bool((weight[~mask] == 0).all())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["sparsity/exact_nm"] for x in lines] == [0.0, 1.0]
    assert 0.5 < lines[-1]["sparsity/train_flops_ratio"] < 1.0  # dense epoch at 1, sparse epoch below
    # after the dense phase's last step the fine-tuning schedule starts again from the top
    # (one cosine over both phases would be half way down, at optim.lr / 2)
    assert lines[0]["lr"] == pytest.approx(cfg.optim.lr)

    # Start another run from the hand-off: pruned at once, fine-tuned for the whole schedule.
    again = make_config("sparsity=asp", f"trainer.init_from={run_dir / 'dense.pt'}", "schedule.epochs=1",
                        "sparsity.dense_epochs=0", run_dir=tmp_path / "from_dense")
    result = trainer.run(again)
    assert result["sparsity/exact_nm"] == 1.0
    model = checkpoint.load(tmp_path / "from_dense" / "last.pt")["model"]
    assert any(k.endswith(".mask") and not bool(v.all()) for k, v in model.items())


def test_open_ended_phase_takes_the_rest():
    from lbc.engine.optim import phase_lengths

    assert phase_lengths([("dense", 3), ("finetune", None)], 5) == [3.0, 2.0]
    assert phase_lengths([("finetune", None)], 4) == [4.0]
    assert phase_lengths([], 6) == [6.0]
    with pytest.raises(ConfigError, match="schedule.epochs=3"):
        phase_lengths([("dense", 3), ("finetune", None)], 3)


def test_phases_must_add_up_to_the_schedule(make_config):
    cfg = make_config("sparsity=asp", "sparsity.dense_epochs=1", "sparsity.finetune_epochs=3")
    with pytest.raises(ConfigError, match="schedule.epochs"):
        trainer.run(cfg)

"""``lbc-train task=detection`` resumes inside an epoch and ends bit-exact with an uninterrupted run (issue 20):
a SIGTERM in epoch 1 writes ``iter_<n>.pth`` at that iteration; the resumed run writes ``iter_<n>.pth`` every
``trainer.checkpoint_every`` iterations (the newest only) and is then killed with SIGKILL inside epoch 2; the
second resume continues from the last ``iter_<n>.pth`` with the next batch. The final weights, scores, masks and
optimizer state equal the uninterrupted run's bit for bit, and so does every ``metrics.jsonl`` record but its
seconds. mmengine's own ``EpochBasedTrainLoop`` would retrain the epoch's first batches (they would differ)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT

pytestmark = pytest.mark.slow

# 12 images, batch 2: 6 iterations an epoch; LBC's removal spans the two epochs' iterations
TINY = ["task=detection", "data.train_images=12", "data.val_images=4", "data.image_size=64", "data.batch_size=2",
        "data.val_batch_size=4", "schedule.epochs=2", "schedule.milestones=[]", "schedule.warmup_iters=3",
        "trainer.log_interval=1", "trainer.progress=false", "sparsity.t_i=0", "sparsity.t_f=1.5"]

# Runs lbc-train; after training iteration `at` (0-based, across epochs) the process of rank `rank` (0 when not under
# torchrun) sends itself `sig`, from SparsityHook's after_train_iter, which runs before lbc's control hook saves a
# checkpoint due at that iteration.
KILLER = """
import os, signal, sys
from lbc.detection.hook import SparsityHook
sig, at, rank = getattr(signal, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
original = SparsityHook.after_train_iter
def after_train_iter(self, runner, *args, **kwargs):
    original(self, runner, *args, **kwargs)
    if runner.iter == at and int(os.environ.get("RANK", 0)) == rank:
        os.kill(os.getpid(), sig)
SparsityHook.after_train_iter = after_train_iter
from lbc.cli.train import main
main(sys.argv[4:])
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def train(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    command = [PYTHON, "-c", KILLER, kill[0], str(kill[1]), "0", *args] if kill else [PYTHON, "-m", "lbc.cli.train", *args]
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def torchrun(script: Path, args: list[str], kill: tuple[str, int, int] | None = None) -> subprocess.CompletedProcess:
    """``lbc-train`` in 2 gloo processes (torchrun needs a script file: the KILLER, which kills nothing without
    ``kill``)."""
    script.write_text(KILLER)
    signal_args = [kill[0], str(kill[1]), str(kill[2])] if kill else ["SIGKILL", "-1", "-1"]
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *signal_args, *args]
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def load(path: Path) -> dict:
    import torch

    from lbc.detection.checkpoint import mmengine_safe_globals

    with mmengine_safe_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def final_state(run_dir: Path) -> dict:
    ckpt = load(run_dir / "epoch_2.pth")
    return {"state_dict": ckpt["state_dict"], "optimizer": ckpt["optimizer"]["state"]}


def assert_same(a, b, where: str = "") -> None:
    import torch

    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, where


def test_sigterm_and_sigkill_inside_epochs_resume_bit_exact(tmp_path: Path):
    data = f"data.root={tmp_path / 'shapes'}"
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = train([*TINY, data, f"run_dir={straight}", "trainer.checkpoint_every=null"])
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert not list(straight.glob("iter_*.pth"))  # checkpoint_every=null: epoch ends only

    args = [*TINY, data, f"run_dir={split}", "trainer.checkpoint_every=4"]
    # 1. SIGTERM after the third iteration of epoch 1: iter_3.pth is written there, and last_checkpoint names it
    first = train(args, kill=("SIGTERM", 2))
    assert first.returncode == 143, (first.stdout[-3000:], first.stderr[-3000:])
    assert "Traceback" not in first.stderr
    line = [ln for ln in first.stdout.splitlines() if ln.startswith("stopped by SIGTERM")]
    assert line == [f"stopped by SIGTERM at epoch 1 step 3; checkpoint written to {split / 'iter_3.pth'} "
                    "(resume: run the same command again)"], first.stdout[-3000:]
    assert (split / "last_checkpoint").read_text().strip() == str(split / "iter_3.pth")
    assert sorted(p.name for p in split.glob("*.pth")) == ["iter_3.pth"] and not list(split.glob(".*.tmp"))

    # 2. the resume starts at epoch 1 step 3; every 4 iterations iter_<n>.pth replaces the previous one, epoch_1.pth
    # replaces them all; SIGKILL after the third iteration of epoch 2 (iteration 9): iter_8.pth is the newest
    second = train(args, kill=("SIGKILL", 8))
    assert second.returncode == -9, (second.stdout[-3000:], second.stderr[-3000:])
    assert f"resuming from {split / 'iter_3.pth'} at epoch 1 step 3" in second.stdout, second.stdout[-3000:]
    assert sorted(p.name for p in split.glob("*.pth")) == ["epoch_1.pth", "iter_8.pth"]
    assert (split / "last_checkpoint").read_text().strip() == str(split / "iter_8.pth")

    # 3. the second resume continues with epoch 2's third batch and finishes
    third = train(args)
    assert third.returncode == 0, (third.stdout[-3000:], third.stderr[-3000:])
    assert f"resuming from {split / 'iter_8.pth'} at epoch 2 step 2" in third.stdout, third.stdout[-3000:]
    assert not list(split.glob("iter_*.pth"))  # the epoch's checkpoint made it obsolete

    assert records(split) == records(straight) and [r["epoch"] for r in records(split)] == [1, 2]
    assert_same(final_state(split), final_state(straight))


def test_two_processes_rank_1_killed_inside_an_epoch_resume_bit_exact(tmp_path: Path):
    """Under torchrun (2 gloo processes, 6 iterations an epoch each) every checkpoint holds each rank's RNG states
    (their streams differ: the detector's samplers draw as many numbers as each rank's proposals), and each rank
    resumes with its own: SIGKILL of rank 1 inside epoch 2 leaves ``iter_8.pth``, and the resume ends with the
    uninterrupted run's weights, optimizer state and records."""
    import torch

    two = [*TINY, f"data.root={tmp_path / 'shapes'}", "data.train_images=24", "trainer.checkpoint_every=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = torchrun(tmp_path / "job.py", [*two, f"run_dir={straight}"])
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])

    killed = torchrun(tmp_path / "job.py", [*two, f"run_dir={split}"], kill=("SIGKILL", 9, 1))
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert (split / "last_checkpoint").read_text().strip() == str(split / "iter_8.pth")
    ckpt = load(split / "iter_8.pth")
    assert (ckpt["meta"]["epoch"], ckpt["meta"]["epoch_step"]) == (1, 2)
    rngs = ckpt["lbc_rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # one rank cannot stand for both

    again = torchrun(tmp_path / "job.py", [*two, f"run_dir={split}"])
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert f"resuming from {split / 'iter_8.pth'} at epoch 2 step 2" in again.stdout, again.stdout[-3000:]
    assert records(split) == records(straight) and [r["epoch"] for r in records(split)] == [1, 2]
    assert_same(final_state(split), final_state(straight))

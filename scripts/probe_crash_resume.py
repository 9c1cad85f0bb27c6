#!/usr/bin/env python
"""Kill training runs at random moments, resume them, and check they end bit-identical to a straight run.

    python scripts/probe_crash_resume.py --trials 12               # SIGKILL, SIGTERM, SIGINT, SIGUSR1 in turn
    python scripts/probe_crash_resume.py --trials 8 --workers 2    # with DataLoader workers
    python scripts/probe_crash_resume.py --trials 8 --nproc 2      # lbc-torchrun, 2 gloo ranks: one rank signalled

Each trial starts ``lbc-train`` (a small LBC run on digits, removal step by step, ``last.pt`` every 3
steps inside the epochs) in its own run directory and sends a signal after a random delay: even trials
anywhere (start-up included), odd trials once training has started (at a random step, in evaluation,
sometimes mid-write of last.pt). With ``--nproc 2`` the signal goes to one rank, chosen at random. Then it
runs the same command again until it exits 0. Exit 143/130/138 is the graceful stop (``last.pt`` at the
current step); -9 a death by the signal (``last.pt`` at most 2 steps behind). The final ``last.pt`` must
equal the uninterrupted run's: every model and optimizer tensor, the schedule, the sparsity state and
the epoch. Prints one line per trial (where the interrupted run's last.pt stood) and a summary.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ARGS = ["trainer=smoke", "trainer.max_steps_per_epoch=8", "schedule.epochs=4", "schedule.warmup_epochs=0",
        "data.loader.batch_size=16", "sparsity=lbc", "sparsity.t_f=2", "sparsity.update_every=step",
        "trainer.ema=true", "trainer.checkpoint_every=3"]
SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]


def lbc_train(run_dir: Path, workers: int, nproc: int) -> subprocess.Popen:
    args = [*ARGS, f"data.loader.workers={workers}", f"run_dir={run_dir}"]
    if nproc > 1:
        cmd = [str(Path(sys.executable).with_name("lbc-torchrun")), f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [str(Path(sys.executable).with_name("lbc-train")), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(random.randint(20000, 60000))}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def ranks(proc: subprocess.Popen) -> list[int]:
    """The pids of the processes ``proc`` started (torchrun's ranks), from /proc."""
    try:
        return [int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    except OSError:
        return []


def position(path: Path) -> str:
    """Where a checkpoint stands: ``epoch E step k`` (1-based epoch in progress), or ``end of epoch E``."""
    if not path.is_file():
        return "no last.pt"
    ckpt = torch.load(path, weights_only=True)
    step = int(ckpt.get("epoch_step") or 0)
    return f"last.pt at epoch {ckpt['epoch'] + 1} step {step}" if step else f"last.pt at end of epoch {ckpt['epoch']}"


def same_state(a: Path, b: Path) -> str | None:
    """None when the two checkpoints hold the same training state, else what differs."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if (x["epoch"], x.get("epoch_step")) != (y["epoch"], y.get("epoch_step")):
        return f"epoch {x['epoch']} != {y['epoch']}"
    for key in (x.get("ema") or {}):
        if not torch.equal(torch.as_tensor(x["ema"][key]), torch.as_tensor(y["ema"][key])):
            return f"ema.{key}"
    for key in x["model"]:
        if not torch.equal(x["model"][key], y["model"][key]):
            return f"model.{key}"
    for index, slots in x["optimizer"]["state"].items():
        for name, value in slots.items():
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(y["optimizer"]["state"][index][name])):
                return f"optimizer.state[{index}].{name}"
    if x["scheduler"] != y["scheduler"] or x["sparsity"] != y["sparsity"]:
        return "scheduler or sparsity state"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data.loader.workers")
    parser.add_argument("--nproc", type=int, default=1, help="processes (lbc-torchrun, gloo) when > 1")
    args = parser.parse_args()
    launch = lambda run_dir: lbc_train(run_dir, args.workers, args.nproc)  # noqa: E731
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lbc_probe_"))
    t0 = time.perf_counter()
    straight = launch(work / "straight")
    if straight.wait() != 0:
        print(f"the straight run failed: {straight.stderr.read()}", file=sys.stderr)
        return 1
    length = time.perf_counter() - t0
    epochs = [line for line in (work / "straight" / "train.log").read_text().splitlines() if "] epoch " in line]
    train_seconds = sum(float(line.rsplit(" ", 1)[-1].rstrip("s")) for line in epochs)
    print(f"straight run: {length:.1f} s ({train_seconds:.1f} s of epochs); trials in {work}")
    exact = 0
    for trial in range(args.trials):
        sig = SIGNALS[trial % len(SIGNALS)]
        run_dir = work / f"trial{trial}"
        proc = launch(run_dir)
        if trial % 2:  # during training: the delay counts from the start line, within the epochs
            log = run_dir / "train.log"
            while proc.poll() is None and not (log.is_file() and "epochs x" in log.read_text()):
                time.sleep(0.05)
            delay = rng.uniform(0.0, max(0.5, 0.8 * train_seconds))  # inside the epochs, not after the end
            time.sleep(delay)
            when = "in training"
        else:  # anywhere, start-up included
            delay = rng.uniform(0.3, length * 0.95)
            time.sleep(delay)
            when = "anywhere   "
        children = ranks(proc) if args.nproc > 1 else []
        target = rng.choice(children) if children else proc.pid
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass
        first = proc.wait()
        where = position(run_dir / "last.pt")
        restarts, code = 0, None
        while code != 0 and restarts < 3:
            restarts += 1
            again = launch(run_dir)
            code = again.wait()
        diff = same_state(work / "straight" / "last.pt", run_dir / "last.pt") if code == 0 else "did not finish"
        exact += diff is None
        leftovers = sorted(p.name for p in run_dir.glob(".*.tmp"))
        rank = f" rank of {len(children)}" if children else ""
        print(f"trial {trial:2d}: {sig.name:7s}{rank} {when} after {delay:4.1f} s -> exit {first:4d}, {where}; "
              f"resumed x{restarts} -> "
              f"{'bit-exact' if diff is None else 'DIFFERS: ' + diff}{'; temp files left: ' + str(leftovers) if leftovers else ''}")
    print(f"{exact}/{args.trials} kill-and-resume trials ended bit-exact")
    return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())

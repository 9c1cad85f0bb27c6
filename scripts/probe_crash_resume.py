#!/usr/bin/env python
"""Kill training runs at random moments, resume them, and check they end bit-identical to a straight run.

    python scripts/probe_crash_resume.py --trials 12           # SIGKILL, SIGTERM and SIGINT in turn

Each trial starts ``lbc-train`` (a small LBC run on digits) in its own run directory and sends a signal
after a random delay: even trials anywhere (start-up included), odd trials once training has started
(mid-epoch, in evaluation, sometimes mid-write of last.pt). Then it runs the same command again
until it exits 0. Exit 143/130 is the graceful stop; -9/-15/-2 a death by the signal. The final ``last.pt`` must equal the uninterrupted run's: every model and
optimizer tensor, the schedule and the epoch. Prints one line per trial and a summary.
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
        "data.loader.batch_size=16", "sparsity=lbc", "sparsity.t_f=2", "trainer.ema=true"]
SIGNALS = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]


def lbc_train(run_dir: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("lbc-train")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(script), *ARGS, f"run_dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def same_state(a: Path, b: Path) -> str | None:
    """None when the two checkpoints hold the same training state, else what differs."""
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x["epoch"] != y["epoch"]:
        return f"epoch {x['epoch']} != {y['epoch']}"
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
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="lbc_probe_"))
    t0 = time.perf_counter()
    straight = lbc_train(work / "straight")
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
        proc = lbc_train(run_dir)
        if trial % 2:  # during training: the delay counts from the start line, within the epochs
            log = run_dir / "train.log"
            while proc.poll() is None and not (log.is_file() and "epochs x" in log.read_text()):
                time.sleep(0.05)
            delay = rng.uniform(0.0, max(0.5, train_seconds))
            time.sleep(delay)
            when = "in training"
        else:  # anywhere, start-up included
            delay = rng.uniform(0.3, length * 0.95)
            time.sleep(delay)
            when = "anywhere   "
        proc.send_signal(sig)
        first = proc.wait()
        restarts, code = 0, None
        while code != 0 and restarts < 3:
            restarts += 1
            again = lbc_train(run_dir)
            code = again.wait()
        diff = same_state(work / "straight" / "last.pt", run_dir / "last.pt") if code == 0 else "did not finish"
        exact += diff is None
        leftovers = sorted(p.name for p in run_dir.glob(".*.tmp"))
        print(f"trial {trial:2d}: {sig.name:7s} {when} after {delay:4.1f} s -> exit {first:4d}; resumed x{restarts} -> "
              f"{'bit-exact' if diff is None else 'DIFFERS: ' + diff}{'; temp files left: ' + str(leftovers) if leftovers else ''}")
    print(f"{exact}/{args.trials} kill-and-resume trials ended bit-exact")
    return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())

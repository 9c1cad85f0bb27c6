#!/usr/bin/env python
"""Reproduce one of the paper's tables: run every row (and seed) as its own training run.

    python scripts/reproduce.py --table table1                        # full scale: torchrun, presets
    python scripts/reproduce.py --table table1 --scale small          # this CPU: digits, resnet_small
    python scripts/reproduce.py --table table5 --scale small --rows 'lbc_*' --seeds 0 --dry-run
    python scripts/reproduce.py --table table1 --launcher slurm hydra.launcher.partition=gpu data.root=/data/imagenet

Full scale runs each row's preset (``experiment=<preset>``, listed in ``scripts/paper_tables.yaml``)
under ``torchrun`` (``python -m lbc.cli.torchrun``). Processes per node, nodes, this node's rank and
the rendezvous address come from the environment (:func:`torchrun_args`): ``NPROC_PER_NODE``,
``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, else SLURM's variables inside an
allocation (start one copy per node there: ``srun --ntasks-per-node=1 bash scripts/table1.sh``),
else one node with every visible GPU. ``--launcher slurm`` submits the runs as one array job through
Hydra's submitit launcher (the ``slurm`` extra); each job runs the same torchrun command on its nodes.
``--launcher local`` runs one process per run (in this process for classification rows).

Small scale runs every row of the table on this CPU, each a preset too (``experiment=small/<table>/<row>``,
listed under ``small`` in ``scripts/paper_tables.yaml``): the embedded digits data and ``resnet_small``
(Tables 2 and 3: small detectors on the generated shapes set), a few epochs, several seeds, one run at
a time, in this process where it can (no start-up per run). ``--epochs N`` runs each row's schedule
at N epochs (:func:`epochs_overrides`).

Each run writes to ``<out>/<table>/<scale>/<row>/seed<k>/``, where ``row.json`` (what the run stands
for: table, row, preset, seed, overrides, the paper row it is compared with) is written before it
starts. A finished run (metrics.jsonl reached config.yaml's schedule.epochs) is skipped when it was run
with the overrides this command would give it (``row.json``'s); a finished run of other settings
(``--epochs``, another lr, ...) is never reported for this command nor overwritten: the command is
refused in one line naming the keys that differ (:func:`settings_changed`; use another ``--out``). An
unfinished one resumes: the trainer continues from ``run_dir/last.pt`` when it is given the same ``run_dir``.

Before anything runs (``--dry-run`` too) the command is checked as a real run would find it: the seeds,
``--out``, the torchrun environment (:func:`check_env`), and each run's config, composed with Hydra's
compose API and checked as ``lbc-train`` does (:func:`config_problems`): an override that no run can
take is one line, exit status 2; a row that cannot take it is marked in the dry run (exit status 1)
and fails with its one line in a real run while the others go on.
A failed run is one line (its last ``error:`` line) and the others go on; the exit status is 0 when
every run finished, 1 when one failed, 2 for a bad command line, 130/143 when stopped by
Ctrl-C/SIGTERM (run it again to resume).
Extra ``key=value`` arguments are Hydra overrides for every run (``data.root=/data/imagenet``);
``hydra.launcher.*`` ones go to the SLURM submission.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLES = ROOT / "scripts" / "paper_tables.yaml"
CONFIGS = ROOT / "lbc" / "configs"
EXPERIMENTS = CONFIGS / "experiment"
MAX_SEED = 2**32 - 1  # numpy's seed range (torch's is wider)
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6")
DETECTION_TABLES = ("table2", "table3")
SWEEP_ENV = "LBC_REPRODUCE_SLURM_SWEEP"  # set in the child that runs the SLURM sweep (see submit_slurm)


class UsageError(Exception):
    """A bad command line or a missing file: one line on stderr, exit status 2."""


@dataclass
class Row:
    """One row of a table at one scale: its id, what it passes to ``lbc-train``, what it stands for."""

    id: str
    overrides: list[str]
    preset: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # paper_row, method, pattern, criterion (+ full: t_i, t_f)
    detection: bool = False


@dataclass
class Run:
    """One row and seed: a run directory and the ``lbc-train`` overrides that fill it."""

    table: str
    scale: str
    row: Row
    seed: int
    run_dir: Path
    overrides: list[str]  # without run_dir (added when launched)

    @property
    def name(self) -> str:
        return f"{self.row.id} seed{self.seed}"

    def row_json(self) -> dict[str, Any]:
        return {"table": self.table, "row": self.row.id, "preset": self.row.preset, "scale": self.scale,
                "seed": self.seed, "overrides": self.overrides, **self.row.info}

    def train_args(self) -> list[str]:
        return [*self.overrides, f"run_dir={self.run_dir}"]


# --- the rows: presets, listed in scripts/paper_tables.yaml ---------------------------------------


def paper_tables(path: Path = PAPER_TABLES) -> dict[str, Any]:
    """``tables`` of scripts/paper_tables.yaml (one-line UsageError if it is missing or malformed)."""
    try:
        data = yaml.safe_load(path.read_text())
        return dict(data["tables"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read the paper's tables from {path}: {type(e).__name__}: {e}") from None


def full_rows(table: str, tables: Mapping[str, Any]) -> list[Row]:
    """The table's rows that have a preset (``experiment=<preset>``); paper-only rows are left out."""
    rows = []
    for r in tables[table]["rows"]:
        if not r.get("preset"):
            continue
        info = {"paper_row": r["id"], **{k: r.get(k) for k in ("method", "pattern", "t_i", "t_f", "criterion")}}
        rows.append(Row(r["id"], [f"experiment={r['preset']}"], preset=r["preset"], info=info,
                        detection=table in DETECTION_TABLES))
    return rows


def small_rows(table: str, tables: Mapping[str, Any], epochs: int | None = None) -> list[Row]:
    """The table's small-scale rows (its ``small`` list), each its preset ``small/<table>/<row>`` and,
    with ``epochs``, that row's schedule at ``epochs`` epochs."""
    rows = []
    for r in tables[table].get("small") or []:
        detection = table in DETECTION_TABLES
        schedule = epochs_overrides(r["method"], detection, epochs) if epochs else []
        info = {k: r.get(k) for k in ("paper_row", "method", "pattern", "criterion")}
        rows.append(Row(r["id"], [f"experiment={r['preset']}", *schedule], preset=r["preset"], info=info,
                        detection=detection))
    if not rows:
        raise UsageError(f"--table {table} has no small-scale rows")
    return rows


def epochs_overrides(method: str, detection: bool, epochs: int) -> list[str]:
    """A small-scale row at ``epochs`` epochs instead of its preset's 12 (detection 6).

    What the presets derive from ``schedule.epochs`` (LBC's t_f at half of them, Table 5's (t_i, t_f)
    of the paper's 120 epochs) follows by itself; this sets the rest: ASP trains ``epochs`` dense and
    2/3 of that masked (the paper's 120 + 80), detection steps its lr near 2/3 and at the end (mmdet's
    1x: 8 and 11 of 12), and a run of one epoch has no warm-up.
    """
    if detection:
        milestones = sorted({m for m in (round(epochs * 2 / 3), epochs - 1) if 0 < m < epochs})
        return [f"schedule.epochs={epochs}", f"schedule.milestones=[{','.join(map(str, milestones))}]"]
    if method == "asp":
        return [f"schedule.epochs={epochs + round(epochs * 2 / 3)}", f"sparsity.dense_epochs={epochs}"]
    return [f"schedule.epochs={epochs}", *(["schedule.warmup_epochs=0"] if epochs == 1 else [])]


def max_steps_overrides(steps: int, detection: bool) -> list[str]:
    """A quick check: ``steps`` training steps and evaluation batches per epoch (detection: a data set
    of ``steps`` batches of 4 images and 4 validation images; mmengine has no step limit per epoch)."""
    if detection:
        return [f"data.train_images={4 * steps}", "data.val_images=4"]
    return [f"trainer.max_steps_per_epoch={steps}", f"trainer.max_eval_steps={steps}"]


# --- where runs stand -------------------------------------------------------------------------------


def run_state(run_dir: Path) -> tuple[str, int]:
    """(``new`` | ``partial`` | ``finished``, epochs done): finished when metrics.jsonl has reached the
    ``schedule.epochs`` of the run's own config.yaml (what the trainer wrote when it started). A record
    that does not read (a line torn by a kill) is partial: the resume drops it."""
    done = 0
    if (run_dir / "metrics.jsonl").is_file():  # lbc's reader imports torch: not for a run with no record yet
        from lbc.run.records import MetricsError, read_metrics

        try:
            done = max((r["epoch"] for r in read_metrics(run_dir)), default=0)
        except MetricsError:
            return "partial", 0
    epochs = None
    with contextlib.suppress(OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        epochs = int(yaml.safe_load((run_dir / "config.yaml").read_text())["schedule"]["epochs"])
    if epochs is not None and done >= epochs:
        return "finished", done
    started = any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "last.pt"))
    return ("partial" if started or done else "new"), done


def summary(run_dir: Path) -> str:
    """The run's final figures from its last metrics.jsonl record (top-1 or mAP, density)."""
    from lbc.run.records import MetricsError, last_metrics

    try:
        last = last_metrics(run_dir)
    except MetricsError as e:
        return str(e)
    parts = [f"{label} {last[key] * scale:.2f}" for key, label, scale in
             (("top1", "top-1", 1.0), ("coco/bbox_mAP", "bbox mAP", 100.0), ("coco/segm_mAP", "segm mAP", 100.0))
             if isinstance(last.get(key), (int, float))]
    if isinstance(last.get("sparsity/density"), (int, float)):
        parts.append(f"density {last['sparsity/density']:.3f}")
    return ", ".join(parts) or "no metrics"


# --- torchrun from the environment ------------------------------------------------------------------


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``, ``a[1-2]-b[7]`` -> ``a1-b7``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end])


def _gpus_on_node(env: Mapping[str, str]) -> str:
    """Processes per node: NPROC_PER_NODE, SLURM's GPUs on this node, else every visible GPU (or 1)."""
    if env.get("NPROC_PER_NODE"):
        return env["NPROC_PER_NODE"]
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):  # "4" or "a100:4"
        value = env.get(key, "").split(",")[0].split(":")[-1]
        if value.isdigit() and int(value) > 0:
            return value
    import torch  # only here: a second of start-up

    return str(max(torch.cuda.device_count(), 1))


def _int_env(env: Mapping[str, str], *keys: str) -> int | None:
    """The first of ``keys`` that is set, as an integer (one-line UsageError naming it if it is not one)."""
    for key in keys:
        if env.get(key):
            try:
                return int(env[key])
            except ValueError:
                raise UsageError(f"{key}={env[key]!r} is not an integer") from None
    return None


def _checked_int(key: str, value: str, low: int, high: int | None, what: str) -> int:
    """``value`` of ``key`` as an integer in [low, high] (one-line UsageError naming it otherwise)."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        allowed = f"an integer from {low}" + (f" to {high}" if high is not None else "")
        raise UsageError(f"{key}={value!r} is not allowed; use {allowed} ({what})")
    return number


def check_env(env: Mapping[str, str]) -> None:
    """The torchrun variables a run would use, checked before anything starts (torchrun would stop each
    run on them): ``NPROC_PER_NODE`` and ``NNODES`` positive, ``NODE_RANK`` below the node count,
    ``MASTER_PORT`` a TCP port."""
    if env.get("NPROC_PER_NODE"):
        _checked_int("NPROC_PER_NODE", env["NPROC_PER_NODE"], 1, None, "processes per node")
    nnodes = 1
    for key in ("NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(key):
            nnodes = _checked_int(key, env[key], 1, None, "nodes")
            break
    if env.get("NODE_RANK"):
        _checked_int("NODE_RANK", env["NODE_RANK"], 0, nnodes - 1, f"this node's rank among {nnodes} node(s)")
    if env.get("MASTER_PORT"):
        _checked_int("MASTER_PORT", env["MASTER_PORT"], 1, 65535, "the rendezvous TCP port")


def torchrun_args(env: Mapping[str, str]) -> list[str]:
    """torchrun's options for this node, from the environment (``NPROC_PER_NODE``, ``NNODES``,
    ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; inside a SLURM allocation ``SLURM_JOB_NUM_NODES``,
    ``SLURM_NODEID``, the first host of ``SLURM_JOB_NODELIST`` and a port from ``SLURM_JOB_ID``).

    One node without a given address: ``--standalone`` (torchrun picks a free port).
    """
    nproc = _gpus_on_node(env)
    nnodes = _int_env(env, "NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1
    if nnodes == 1 and not env.get("MASTER_ADDR"):
        return ["--standalone", f"--nproc_per_node={nproc}"]
    rank = env.get("NODE_RANK") or env.get("SLURM_NODEID") or "0"  # as given: the dry run shows $SLURM_NODEID
    addr = env.get("MASTER_ADDR") or (first_host(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST") else "")
    if not addr:
        raise UsageError(f"NNODES={nnodes}: set MASTER_ADDR to the host of node rank 0 (and NODE_RANK on each node)")
    if "NODE_RANK" not in env and "SLURM_NODEID" in env and not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        raise UsageError(f"this SLURM allocation has {nnodes} nodes: start one copy per node, e.g. "
                         "srun --ntasks-per-node=1 bash scripts/tableN.sh ... (or submit with --launcher slurm)")
    port = env.get("MASTER_PORT") or (str(29500 + int(env["SLURM_JOB_ID"]) % 1000)
                                      if env.get("SLURM_JOB_ID", "").isdigit() else "29500")
    return [f"--nnodes={nnodes}", f"--node_rank={rank}", f"--nproc_per_node={nproc}",
            f"--master_addr={addr}", f"--master_port={port}"]


def node_rank(env: Mapping[str, str]) -> int:
    """This node's rank (``NODE_RANK``, else ``SLURM_NODEID``; 0 when unset or not a number)."""
    with contextlib.suppress(ValueError):
        return int(env.get("NODE_RANK") or env.get("SLURM_NODEID") or 0)
    return 0


def torchrun_command(train_args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    return [sys.executable, "-m", "lbc.cli.torchrun", *torchrun_args(env), "--", *train_args]


def local_command(train_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "lbc.cli.train", *train_args]


# --- running one run --------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    message: str = ""


_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d*\]:\s*")  # what torchrun puts before a worker's lines
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b:?")


def _error_line(text: str) -> str:
    """The line that says why a run failed: its last ``error:`` line (lbc's, argparse's ``prog: error:``),
    else the last exception line of a traceback, else the last line with words in it (not torchrun's
    ``=====`` frame around its failure summary)."""
    lines = [_RANK_PREFIX.sub("", ln.strip()) for ln in re.split(r"[\r\n]+", text)]
    lines = [ln for ln in lines if re.search(r"[A-Za-z0-9]", ln)]
    for pick in (lambda ln: ln.startswith("error:") or re.match(r"^[\w.-]+: error: ", ln),
                 lambda ln: _EXCEPTION.match(ln) and not ln.startswith("torch.distributed.elastic"),
                 lambda ln: True):
        chosen = next((ln for ln in reversed(lines) if pick(ln)), None)
        if chosen:
            return chosen[:300]
    return ""


class _Tee(io.TextIOBase):
    """Writes to a buffer and, unless ``quiet``, to the real stream too."""

    def __init__(self, real: Any, quiet: bool) -> None:
        self.real, self.quiet, self.buffer_ = real, quiet, io.StringIO()

    def write(self, s: str) -> int:
        self.buffer_.write(s)
        if not self.quiet:
            self.real.write(s)
        return len(s)

    def flush(self) -> None:
        if not self.quiet:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", None) or "utf-8"


def run_in_process(run: Run, quiet: bool) -> Outcome:
    """``lbc-train`` in this process (no interpreter start-up per run); its output goes to
    ``run_dir/output.log`` (and the console unless ``quiet``)."""
    from lbc.cli import train  # torch and Hydra: imported only when a run trains here

    out, err = _Tee(sys.stdout, quiet), _Tee(sys.stderr, quiet)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.main(run.train_args())
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001  (one line for this run; the others go on)
        err.write(f"error: {type(e).__name__}: {e}\n")
        code = 1
    with contextlib.suppress(OSError), open(run.run_dir / "output.log", "a") as f:
        f.write(out.buffer_.getvalue() + err.buffer_.getvalue())
    return Outcome(code, _error_line(err.buffer_.getvalue()) if code else "")


def run_child(cmd: Sequence[str], run_dir: Path, quiet: bool) -> Outcome:
    """``cmd`` as a child process; stdout and stderr go to ``run_dir/output.log`` (and the console
    unless ``quiet``); the failure message is its last ``error:`` line."""
    tail: collections.deque[bytes] = collections.deque(maxlen=64)
    with open(run_dir / "output.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
                log.write(chunk)
                tail.append(chunk)
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            code = proc.wait()
        except KeyboardInterrupt:  # the child got the Ctrl-C too: let it save and stop
            code = proc.wait()
            code = code if code else 130
    code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
    return Outcome(code, _error_line(b"".join(tail).decode(errors="replace")) if code else "")


# --- the launcher ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown option, a bad choice) are one UsageError line, not usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = _Parser(
        prog="reproduce.py", description="Run one of the paper's tables, every row and seed, full or small scale.",
        epilog="Extra key=value arguments are Hydra overrides for every run (hydra.launcher.* ones go to "
               "--launcher slurm's submission).")
    p.add_argument("--table", required=True, help="table1 ... table6 (or 1 ... 6)")
    p.add_argument("--scale", choices=("full", "small"), default="full",
                   help="full: the paper's presets (GPUs); small: this CPU, digits / shapes (default: full)")
    p.add_argument("--rows", default="*", help="comma-separated globs of row ids (default: all rows)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0 at full scale, 0,1,2 small)")
    p.add_argument("--out", default="runs", help="runs go to OUT/<table>/<scale>/<row>/seed<k> (default: runs)")
    p.add_argument("--launcher", choices=("torchrun", "slurm", "local"), default=None,
                   help="torchrun (full-scale default), slurm (submitit, the 'slurm' extra), "
                        "local (one process per run; small-scale default)")
    p.add_argument("--epochs", type=int, default=None,
                   help="small scale: epochs per run (default: the presets' 12; detection 6); "
                        "t_f and Table 5's (t_i, t_f) follow")
    p.add_argument("--max-steps", type=int, default=None, help="a quick check: at most this many steps per epoch")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="small scale: show each run's own output too")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.root=/data/imagenet")
    args = p.parse_intermixed_args(list(argv))  # overrides before and after the options
    args.table = args.table if args.table.startswith("table") else f"table{args.table}"
    if args.table not in TABLES:
        raise UsageError(f"--table {args.table} is not a table of the paper; choose from: {', '.join(TABLES)}")
    args.seeds = parse_seeds(args.seeds if args.seeds is not None else ("0" if args.scale == "full" else "0,1,2"))
    problem = out_problem(Path(args.out))
    if problem:
        raise UsageError(f"--out {args.out}: {problem}")
    for key in ("epochs", "max_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)}: use a positive integer")
    if args.epochs is not None and args.scale == "full":
        raise UsageError("--epochs is for --scale small; at full scale pass schedule.epochs=N (a Hydra override)")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UsageError(f"{bad[0]!r} is not an option or a Hydra override (key=value)")
    args.launcher = args.launcher or ("torchrun" if args.scale == "full" else "local")
    return args


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated distinct integers from 0 (each is one run directory, ``seed<k>``)."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip():
        raise UsageError("--seeds is empty; give comma-separated seeds, e.g. --seeds 0,1,2")
    try:
        seeds = [int(t) for t in parts]
    except ValueError:
        raise UsageError(f"--seeds {text} is not a comma-separated list of integers") from None
    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise UsageError(f"--seeds {text}: seed {bad[0]} is out of range; use integers from 0 to {MAX_SEED}")
    twice = [s for s in dict.fromkeys(seeds) if seeds.count(s) > 1]
    if twice:
        raise UsageError(f"--seeds {text} names seed {twice[0]} more than once (one run directory per seed); "
                         "give each seed once")
    return seeds


def out_problem(out: Path) -> str | None:
    """Why the runs cannot go under folder ``out`` (it, or a folder above it, is a file), else None."""
    for at in (out, *out.parents):
        if at.is_dir():
            return None
        if at.exists() or at.is_symlink():
            return "is a file; give a folder for the runs" if at == out else f"{at} is a file, not a folder"
    return None


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``base`` then ``extra``, where an ``extra`` override replaces the ``base`` one of the same key
    (Hydra refuses a key given twice): ``schedule.epochs=20`` on the command line wins over the row's."""
    given = {_key(o) for o in extra}
    return [o for o in base if _key(o) not in given] + list(extra)


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run the command asks for: the table's rows (filtered by --rows) times the seeds."""
    tables = paper_tables()
    if args.table not in tables:
        raise UsageError(f"{PAPER_TABLES} has no {args.table}")
    every = full_rows(args.table, tables) if args.scale == "full" else small_rows(args.table, tables, args.epochs)
    globs = [g.strip() for g in args.rows.split(",") if g.strip()]
    rows = [r for r in every if any(fnmatch.fnmatchcase(r.id, g) for g in globs)]
    if not rows:
        raise UsageError(f"--rows {args.rows} matches no row of {args.table} at {args.scale} scale; rows: "
                         + ", ".join(r.id for r in every))
    extra = [o for o in args.overrides if not o.startswith(("hydra.launcher.", "hydra/launcher="))]
    runs = []
    for row in rows:
        quick = max_steps_overrides(args.max_steps, row.detection) if args.max_steps else []
        for seed in args.seeds:
            run_dir = Path(args.out) / args.table / args.scale / row.id / f"seed{seed}"
            runs.append(Run(args.table, args.scale, row, seed, run_dir,
                            merge_overrides([*row.overrides, *quick, f"seed={seed}"], extra)))
    return runs


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """The overrides ``run_dir/row.json`` says its run was (last) started with; None if it says none."""
    try:
        data = json.loads((run_dir / "row.json").read_text())
    except (OSError, ValueError):
        return None
    overrides = data.get("overrides") if isinstance(data, dict) else None
    return [str(o) for o in overrides] if isinstance(overrides, list) else None


def settings_changed(before: Sequence[str], now: Sequence[str]) -> list[str]:
    """Each key whose override differs between ``before`` and ``now``, as ``key (was -> now)``, in order."""
    def values(overrides: Sequence[str]) -> dict[str, str]:
        return {_key(o): o.split("=", 1)[1] if "=" in o else o for o in overrides}

    a, b = values(before), values(now)
    return [f"{k} ({a.get(k, 'unset')} -> {b.get(k, 'unset')})" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def config_changed(run_dir: Path, composed: Any) -> list[str]:
    """A finished run without recorded overrides: the keys whose value in its ``config.yaml`` differs from
    the config this command composes (keys in both; ``run_dir`` aside), as ``key (was -> now)``."""
    from omegaconf import OmegaConf

    from lbc.config.resume import flatten_keys

    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, dict):
        return ["config.yaml (unreadable -> this command's)"]
    was, now = flatten_keys(recorded), flatten_keys(OmegaConf.to_container(composed, resolve=True))
    return [f"{k} ({was[k]} -> {now[k]})" for k in now if k in was and k != "run_dir" and was[k] != now[k]]


@contextlib.contextmanager
def composer() -> Iterator[Callable[[Sequence[str]], Any]]:
    """``compose(overrides)``: the config ``lbc-train overrides`` would get, composed with Hydra's compose API
    from lbc's configs (Hydra's and OmegaConf's typed errors raised, nothing printed)."""
    from hydra import compose, initialize_config_dir

    import lbc.config  # noqa: F401  (registers the schemas and resolvers, as lbc-train does)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda overrides: compose(config_name="train", overrides=list(overrides))


def config_problems(runs: Sequence[Run]) -> dict[str, str]:
    """``{run name: one line}`` for each run whose config does not compose or pass ``lbc-train``'s checks
    (a bad override, a key the row's method does not have, a required value not given)."""
    from lbc import config as lbc_config

    problems = {}
    with composer() as compose:
        for run in runs:
            try:
                lbc_config.validate(compose(run.train_args()))
            except Exception as e:  # noqa: BLE001  (Hydra's, OmegaConf's and lbc's errors: one line each)
                problems[run.name] = str(lbc_config.as_config_error(e, run.train_args()))
    return problems


def preflight(runs: Sequence[Run]) -> dict[str, str]:
    """What a real run would find before it starts anything, for the dry run and the real run alike.

    A finished run is skipped only when it was run with this command's overrides; a finished run of other
    settings is a UsageError (never reported as this command's result, never overwritten). Each run to
    start is composed and checked (:func:`config_problems`): when none could start, a UsageError with the
    (first) reason; else ``{run name: reason}`` of the runs that would fail at start-up.
    """
    finished = {r.name for r in runs if run_state(r.run_dir)[0] == "finished"}
    changed = []
    for run in (r for r in runs if r.name in finished):
        before = recorded_overrides(run.run_dir)
        if before is None:
            with composer() as compose:
                try:
                    diff = config_changed(run.run_dir, compose(run.train_args()))
                except Exception:  # noqa: BLE001  (cannot compose: config_problems says why below)
                    diff = []
        else:
            diff = settings_changed(before, run.overrides)
        if diff:
            changed.append((run, diff))
    if changed:
        run, diff = changed[0]
        more = f" (and {len(changed) - 1} more run dirs like it)" if len(changed) > 1 else ""
        raise UsageError(f"{run.run_dir} holds a finished run with other settings: {', '.join(diff)}{more}; it is "
                         "not this command's result and is kept: use another --out, or remove it to re-run")
    pending = [r for r in runs if r.name not in finished]
    problems = {r.name: p for r in pending if (p := missing_preset(r))}
    problems.update(config_problems([r for r in pending if r.name not in problems]))
    if pending and len(problems) == len(pending):
        first = problems[pending[0].name]
        if all(p == first for p in problems.values()):
            raise UsageError(first if len(pending) == 1 else f"{first} (every run of this command)")
        raise UsageError(f"no run of this command can start: {pending[0].name}: {first} "
                         f"(and {len(pending) - 1} more; --dry-run lists them)")
    return problems


def missing_preset(run: Run) -> str | None:
    if run.row.preset and not (EXPERIMENTS / f"{run.row.preset}.yaml").is_file():
        return f"preset {run.row.preset} does not exist (lbc/configs/experiment/{run.row.preset}.yaml)"
    return None


def command_for(run: Run, launcher: str, env: Mapping[str, str]) -> list[str]:
    if launcher == "torchrun":
        return torchrun_command(run.train_args(), env)
    return local_command(run.train_args())


def write_row_json(run: Run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.run_dir / "row.json.tmp"
    tmp.write_text(json.dumps(run.row_json(), indent=2) + "\n")
    tmp.replace(run.run_dir / "row.json")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


class RowRecord:
    """``row.json`` written for a run about to start, taken back if the trainer refused it: the trainer writes
    ``config.yaml`` once it has accepted the config and holds the run dir (:meth:`lbc.run.lifecycle.Run.begin`),
    so a run whose ``config.yaml`` was not rewritten never ran with these overrides, and ``row.json`` says
    again what the run dir's last accepted start was (or is removed)."""

    def __init__(self, run: Run) -> None:
        self.path, self.config = run.run_dir / "row.json", run.run_dir / "config.yaml"
        try:
            self.previous: str | None = self.path.read_text()
        except OSError:
            self.previous = None
        self.config_before = _stamp(self.config)
        write_row_json(run)

    def settle(self) -> None:
        """After the trainer ended: keep the new ``row.json`` if it began, else put the previous one back."""
        if _stamp(self.config) != self.config_before:
            return
        if self.previous is None:
            self.path.unlink(missing_ok=True)
        else:
            tmp = self.path.with_name("row.json.tmp")
            tmp.write_text(self.previous)
            tmp.replace(self.path)


def launch(runs: list[Run], args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run ``runs`` one after another (torchrun or local); one line when each starts and ends."""
    tag = f"[{args.table}/{args.scale}]"
    quiet = args.scale == "small" and not args.verbose
    failed, counts = [], collections.Counter()
    main_node = node_rank(env) == 0
    if args.launcher == "torchrun":
        torchrun_args(env)  # a bad environment is one line before anything starts
    for i, run in enumerate(runs, 1):
        head = f"{tag} {i}/{len(runs)} {run.name}"
        state, done = run_state(run.run_dir)
        if state == "finished":
            counts["skipped"] += 1
            print(f"{head}: skipped, finished before ({summary(run.run_dir)})", flush=True)
            continue
        problem = missing_preset(run)
        if problem:
            failed.append(run.name)
            print(f"{head}: failed: {problem}", flush=True)
            continue
        record = RowRecord(run) if main_node else None
        if record is None:
            run.run_dir.mkdir(parents=True, exist_ok=True)
        resume = f", resuming after epoch {done}" if state == "partial" else ""
        print(f"{head}: started{resume} ({run.run_dir})", flush=True)
        t0 = time.perf_counter()
        if args.launcher == "local" and not run.row.detection:
            outcome = run_in_process(run, quiet)  # mmengine keeps global state: detection runs in a child
        else:
            outcome = run_child(command_for(run, args.launcher, env), run.run_dir, quiet)
        if record is not None:
            record.settle()
        took = f"{time.perf_counter() - t0:.0f} s"
        if outcome.code in (130, 143):
            print(f"{head}: stopped after {took} (exit {outcome.code}); run the same command again to resume",
                  flush=True)
            return outcome.code
        if outcome.code == 0 and run_state(run.run_dir)[0] == "finished":
            counts["finished"] += 1
            print(f"{head}: finished in {took}: {summary(run.run_dir)}", flush=True)
        else:
            failed.append(run.name)
            why = outcome.message or ("it printed nothing" if outcome.code else "it ended before its last epoch")
            print(f"{head}: failed (exit {outcome.code}) after {took}: {why} (log: {run.run_dir / 'output.log'})",
                  flush=True)
    report = f"{counts['finished']} finished, {counts['skipped']} skipped, {len(failed)} failed"
    print(f"{tag} done: {report}" + (f" ({', '.join(failed)})" if failed else ""), flush=True)
    return 1 if failed else 0


def dry_run(runs: list[Run], args: argparse.Namespace, env: Mapping[str, str], problems: Mapping[str, str]) -> int:
    """Print the command of every run that would start (finished runs, and runs that would fail at
    start-up with ``problems``' reason, as a comment); exit status 1 when some run would fail."""
    for run in runs:
        state, _ = run_state(run.run_dir)
        if state == "finished":
            print(f"# finished, skipped: {run.run_dir}")
            continue
        if run.name in problems:
            print(f"# {run.name} would fail: {problems[run.name]}")
            continue
        if args.launcher == "slurm":
            cmd = ["<in each job>", *torchrun_command(run.train_args(), _slurm_placeholder_env(args, env))]
        else:
            cmd = command_for(run, args.launcher, env)
        print(shlex.join(cmd))
    if problems:
        name, why = next(iter(problems.items()))
        print(f"error: {len(problems)} run(s) would fail at start-up: {name}: {why}"
              + (" (the others: the comments above)" if len(problems) > 1 else ""), file=sys.stderr)
        return 1
    return 0


# --- SLURM through Hydra's submitit launcher -----------------------------------------------------


# Each job: one task per node (it starts torchrun there), 3 days, requeued up to 5 times after a time
# limit or preemption (the run resumes from its last.pt).
SLURM_DEFAULTS = {"tasks_per_node": 1, "timeout_min": 4320}
SLURM_ONLY_DEFAULTS = {"max_num_timeout": 5}  # submitit_slurm's own key (submitit_local has none)


def _slurm_shape(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[int, int]:
    """(nodes, GPUs per node) of each job: hydra.launcher.nodes/gpus_per_node, else NNODES /
    NPROC_PER_NODE, else one node of 8 GPUs."""
    given = dict(o.split("=", 1) for o in args.overrides if o.startswith("hydra.launcher."))
    shape = []
    for option, variable, default in (("nodes", "NNODES", "1"), ("gpus_per_node", "NPROC_PER_NODE", "8")):
        key = f"hydra.launcher.{option}"
        name, value = (key, given[key]) if given.get(key) else (variable, env.get(variable) or default)
        shape.append(_checked_int(name, value, 1, None, option.replace("_", " ")))
    return shape[0], shape[1]


def _slurm_placeholder_env(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    nodes, gpus = _slurm_shape(args, env)
    return {"SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_NODEID": "$SLURM_NODEID",
            "SLURM_JOB_NODELIST": "<first node of the job>", "SLURM_STEP_ID": "0",
            "MASTER_PORT": "<29500 + job id % 1000>"}


def _slurm_job(cfg: Any) -> int:
    """One SLURM job (on each of its nodes): the run's torchrun command, rendezvous from SLURM's variables."""
    run = json.loads(Path(cfg.runs_file).read_text())[int(cfg.index)]
    try:
        return subprocess.call(torchrun_command([*run["overrides"], f"run_dir={run['run_dir']}"], os.environ))
    except Exception as e:  # noqa: BLE001  (never fail the whole sweep: the submitter reports per run)
        print(f"error: {run['run_dir']}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def require_submitit() -> None:
    """--launcher slurm needs the ``slurm`` extra: one line before anything is checked or written."""
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise UsageError("--launcher slurm needs Hydra's submitit launcher, which is not installed: "
                         "pip install -e '.[slurm]' (or run scripts/tableN.sh inside an allocation)")


def submit_slurm(runs: list[Run], args: argparse.Namespace, env: Mapping[str, str],
                 problems: Mapping[str, str] | None = None) -> int:
    """Submit the unfinished runs as one array job (Hydra multirun, ``hydra/launcher=submitit_slurm``),
    wait for it, then one line per run: finished or failed (a run in ``problems`` is not submitted: it
    fails with its reason)."""
    problems = problems or {}
    require_submitit()
    tag = f"[{args.table}/{args.scale}]"
    pending = [r for r in runs if run_state(r.run_dir)[0] != "finished"]
    for r in runs:
        if r not in pending:
            print(f"{tag} {r.name}: skipped, finished before ({summary(r.run_dir)})", flush=True)
    failed_at_start = [r for r in pending if r.name in problems]  # not submitted: they would fail at start-up
    for r in failed_at_start:
        print(f"{tag} {r.name}: failed: {problems[r.name]}", flush=True)
    pending = [r for r in pending if r not in failed_at_start]
    if not pending:
        return 1 if failed_at_start else 0
    for r in pending:
        write_row_json(r)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sweep = (Path(args.out) / args.table / args.scale / "slurm" / stamp).absolute()
    sweep.mkdir(parents=True, exist_ok=True)
    runs_file = sweep / "runs.json"
    runs_file.write_text(json.dumps([{"overrides": r.overrides, "run_dir": str(r.run_dir.absolute()),
                                      "name": r.name} for r in pending], indent=2))
    nodes, gpus = _slurm_shape(args, env)
    print(f"{tag} submitting {len(pending)} run(s) as one array job ({nodes} node(s) x {gpus} GPU(s) each; "
          f"logs in {sweep}); waiting for them", flush=True)
    # Hydra's multirun reads its command line from the process: it runs in a child whose command line
    # it is (a job that died, node failure or time limit, is found by the per-run check below).
    subprocess.call([sys.executable, str(Path(__file__).resolve()), *sweep_overrides(args, env, sweep, runs_file,
                                                                                     len(pending))],
                    env={**env, SWEEP_ENV: "1"})
    failed = [r for r in pending if run_state(r.run_dir)[0] != "finished"]
    for r in pending:
        result = "failed (see its output in " + str(sweep) + ")" if r in failed else f"finished: {summary(r.run_dir)}"
        print(f"{tag} {r.name}: {result}", flush=True)
    return 1 if failed or failed_at_start else 0


def sweep_overrides(args: argparse.Namespace, env: Mapping[str, str], sweep: Path, runs_file: Path,
                    count: int) -> list[str]:
    """The multirun's command line: the launcher and its settings (ours where the command line gives
    none), the sweep directory, and one job per pending run (``index=0,1,...``)."""
    nodes, gpus = _slurm_shape(args, env)
    given = [o for o in args.overrides if o.startswith(("hydra.launcher.", "hydra/launcher="))]
    own_launcher = any(o.startswith("hydra/launcher=") for o in given)  # e.g. submitit_local, to try it out
    defaults = {"nodes": nodes, "gpus_per_node": gpus, **SLURM_DEFAULTS, **({} if own_launcher else SLURM_ONLY_DEFAULTS)}
    settings = [f"hydra.launcher.{k}={v}" for k, v in defaults.items()
                if not any(o.startswith(f"hydra.launcher.{k}=") for o in given)]
    launcher = [] if own_launcher else ["hydra/launcher=submitit_slurm"]
    return ["-m", *launcher, f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}", *settings, *given,
            f"runs_file={runs_file}", f"index={','.join(str(i) for i in range(count))}"]


def slurm_sweep() -> None:
    """The child :func:`submit_slurm` starts: Hydra's multirun of :func:`_slurm_job` over this process's
    own command line (:func:`sweep_overrides`)."""
    import hydra
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="reproduce_slurm", node={"runs_file": "", "index": 0})
    hydra.main(config_path=None, config_name="reproduce_slurm", version_base="1.3")(_slurm_job)()


def main(argv: Sequence[str] | None = None) -> int:
    env = dict(os.environ)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.launcher in ("torchrun", "slurm"):
            check_env(env)
            if args.launcher == "slurm":
                _slurm_shape(args, env)
            else:
                torchrun_args(env)  # several nodes without an address, or a SLURM batch script: one line
        if args.launcher == "slurm" and not args.dry_run:
            require_submitit()
        runs = plan(args)
        problems = preflight(runs)
        if args.dry_run:
            return dry_run(runs, args, env, problems)
        if args.launcher == "slurm":
            return submit_slurm(runs, args, env, problems)
        return launch(runs, args, env)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # between runs (a run itself stops gracefully and is reported by launch)
        print("stopped by Ctrl-C; run the same command again to go on", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    if os.environ.get(SWEEP_ENV):
        slurm_sweep()
    else:
        sys.exit(main())

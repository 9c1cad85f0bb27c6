#!/usr/bin/env python
"""The language-model tables at small scale on a CPU: run every row, then print the table.

    python scripts/lm_tables.py --table smollm2                 # SmolLM2-135M 2:4: dense, one-shot, learned rows
    python scripts/lm_tables.py --table scratch --seeds 0,1,2   # a small LLaMA from scratch, 2:4 and 1:4
    python scripts/lm_tables.py --table smollm2 --report-only   # print the table of the runs that exist

Each row is a preset (``lbc-train task=lm experiment=lm/small/<table>/<row>``) run in its own process
into ``<out>/<table>/<row>/seed<k>/``; ``row.json`` there records the command it stands for. A finished
run with the same command is reported, not run again; one with another command is refused (remove the
directory or pick another ``--out``); an unfinished one resumes from its ``last.pt``. Extra ``key=value``
arguments are Hydra overrides for every row (they become part of each run's command).

The table: validation perplexity (sliding windows, the same windows for every row), the share of the
gap between the best one-shot row and dense that a learned row closes (MaskLLM's anchor: 69% on
LLaMA-2-7B), training tokens, training FLOPs of the sparsified layers relative to dense (``sparsity/
train_flops_ratio``) and the wall time. With several seeds: mean and the spread (min-max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "lbc" / "configs" / "experiment" / "lm" / "small"

# table -> rows in the order they run: (row id, label, kind). kind: dense | one-shot | learned.
TABLES: dict[str, list[tuple[str, str, str]]] = {
    "smollm2": [
        ("dense", "dense (as shipped)", "dense"),
        ("magnitude", "magnitude, one-shot", "one-shot"),
        ("wanda", "Wanda, one-shot", "one-shot"),
        ("sparsegpt", "SparseGPT, one-shot", "one-shot"),
        ("lbc_frozen_sparsegpt", "LBC, frozen weights, SparseGPT prior", "learned"),
        ("lbc", "LBC, weights trained", "learned"),
        ("lbc_sparsegpt", "LBC, weights trained, SparseGPT prior", "learned"),
        ("srste", "SR-STE", "learned"),
        ("asp_sparsegpt", "ASP fine-tuning from SparseGPT", "learned"),
    ],
    "scratch": [
        ("dense", "dense", "dense"),
        ("srste_2x4", "SR-STE 2:4", "learned"),
        ("lbc_2x4", "LBC 2:4", "learned"),
        ("asp_2x4", "ASP 2:4", "learned"),
        ("srste_1x4", "SR-STE 1:4", "learned"),
        ("lbc_1x4", "LBC 1:4", "learned"),
        ("asp_1x4", "ASP 1:4", "learned"),
    ],
}


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The final record of a run that reached its schedule (its own config.yaml's schedule.steps), else None."""
    import yaml

    records = read_records(run_dir)
    config = run_dir / "config.yaml"
    if not (run_dir / "row.json").is_file() or not records or not config.is_file():
        return None
    steps = ((yaml.safe_load(config.read_text()) or {}).get("schedule") or {}).get("steps")
    last = records[-1]
    return last if steps is not None and last.get("step") == steps else None


def command(table: str, row: str, seed: int, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lbc.cli.train", "task=lm", f"experiment=lm/small/{table}/{row}", f"seed={seed}",
            "trainer.progress=false", *overrides, f"run_dir={run_dir}"]


def run_row(table: str, row: str, seed: int, overrides: list[str], out: Path) -> tuple[dict[str, Any] | None, float]:
    """Run (or resume, or skip) one row; (its final record or None, seconds it took now)."""
    run_dir = out / table / row / f"seed{seed}"
    cmd = command(table, row, seed, overrides, Path("RUN_DIR"))
    meta = run_dir / "row.json"
    if meta.is_file() and json.loads(meta.read_text()).get("command") != cmd:
        raise SystemExit(f"error: {run_dir} holds a run of another command ({json.loads(meta.read_text())['command']}); "
                         "remove it or pick another --out")
    done = finished(run_dir)
    if done is not None:
        return done, 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"table": table, "row": row, "seed": seed, "command": cmd}, indent=1))
    t0 = time.perf_counter()
    print(f"lm_tables: {table}/{row} seed {seed} -> {run_dir}", flush=True)
    code = subprocess.call(command(table, row, seed, overrides, run_dir))
    seconds = time.perf_counter() - t0
    (run_dir / "seconds.txt").write_text(f"{seconds + float_or_zero(run_dir / 'seconds.txt'):.1f}\n")
    if code != 0:
        print(f"lm_tables: {table}/{row} seed {seed} failed (exit {code}); see {run_dir}/train.log", flush=True)
        return None, seconds
    return finished(run_dir), seconds


def float_or_zero(path: Path) -> float:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return 0.0


def number(value: float) -> str:
    """Two decimals; a diverged perplexity (beyond 1e5) in scientific notation."""
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.1e}"


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return number(values[0])
    return f"{number(statistics.mean(values))} ({number(min(values))}-{number(max(values))})"


def table_markdown(table: str, seeds: list[int], out: Path) -> str:
    rows = []
    results: dict[str, list[dict[str, Any]]] = {}
    for row, _, _ in TABLES[table]:
        results[row] = [r for s in seeds if (r := finished(out / table / row / f"seed{s}")) is not None]
    ppl = {row: [r["ppl"] for r in recs] for row, recs in results.items()}
    dense = statistics.mean(ppl["dense"]) if ppl.get("dense") else None
    one_shot = [statistics.mean(ppl[row]) for row, _, kind in TABLES[table] if kind == "one-shot" and ppl[row]]
    best = min(one_shot) if one_shot else None
    header = ["row", "val ppl", "gap closed vs best one-shot", "train tokens", "train FLOPs (sparse layers)",
              "minutes", "runs"]
    for row, label, kind in TABLES[table]:
        recs = results[row]
        if not recs:
            rows.append([label, "not run", "", "", "", "", "0"])
            continue
        mean_ppl = statistics.mean(ppl[row])
        gap = ""
        if kind == "learned" and dense is not None and best is not None and best > dense:
            share = 100 * (best - mean_ppl) / (best - dense)
            gap = f"{share:.0f}%" if share > -1000 else "< -1000%"
        minutes = [float_or_zero(out / table / row / f"seed{s}" / "seconds.txt") / 60 for s in seeds]
        flops = [r.get("sparsity/train_flops_ratio") for r in recs if r.get("sparsity/train_flops_ratio") is not None]
        trained = recs[0].get("tokens", 0) > 0
        rows.append([label, summary(ppl[row]), gap, f"{recs[0].get('tokens', 0):,}",
                     (summary(flops) if flops else "1.00") if trained else "-", f"{sum(minutes) / max(1, len(recs)):.1f}", str(len(recs))])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if best is not None and dense is not None:
        lines.append(f"\ndense ppl {dense:.2f}, best one-shot ppl {best:.2f}: gap {best - dense:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lm_tables.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, choices=sorted(TABLES))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--rows", default=None, help="comma-separated row ids (default: all)")
    parser.add_argument("--out", default="outputs/lm_tables", help="where the runs go (default outputs/lm_tables)")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs that exist")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"not an option or a key=value override: {' '.join(bad)}")
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: use comma-separated integers")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seeds {args.seeds!r}: use one or more integers >= 0")
    known = [r for r, _, _ in TABLES[args.table]]
    rows = known if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in known]
    if unknown:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown)}; the rows of {args.table}: {', '.join(known)}")
    out = Path(args.out)
    failed = 0
    if not args.report_only:
        for seed in seeds:  # every row of a seed before the next seed: a cut-short table still has whole rows
            for row in rows:
                record, _ = run_row(args.table, row, seed, overrides, out)
                failed += record is None
    print(table_markdown(args.table, seeds, out))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The compiled training step (``trainer.compile=true``) of each sparsity method: one graph, and its time over dense.

    python benchmarks/compile_step_time.py                         # CPU, inductor: ResNet-18 at 16x32x32
    python benchmarks/compile_step_time.py --device cuda --sizes 64x224 --steps 50
    python benchmarks/compile_step_time.py --backend aot_eager --steps 2   # tracing only: quick on a CPU

The trainer compiles the model, not the step: ``torch.compile(model)`` (:class:`lbc.run.distributed.Replica`,
the default inductor backend); ``sp.update``, the loss's backward call and the optimizer stay eager, and
AOTAutograd compiles the backward with the forward. Here every variant of :data:`step_time.VARIANTS` is
:func:`step_time.make_step`'s step calling its model compiled the same way, but with
``fullgraph=True``: a graph break raises instead of splitting the forward, and is then reported (graph
count, reasons and source lines from ``torch._dynamo.explain``) and the variant timed as the trainer
would run it (``fullgraph=False``). ``graphs`` counts the graphs compiled at the first step;
``recompiles`` those compiled during the warm-up and timed steps (none is expected: each variant stays
at its epoch), with dynamo's reasons. Each variant has its own compile cache (``isolate_recompiles``),
as a run with one model has.

Times are the median of ``--steps`` round-robin rounds (one step of each variant in turn, so drift of
the machine hits all alike) after ``--warmup`` rounds, as a ratio to compiled dense; the load average
before and after is printed beside them. The first step's time (the compile) is printed too.

LBC after ``t_f`` stops training its scores (``requires_grad`` off), which a compiled graph guards on:
one recompile is expected when a run crosses ``t_f``. ``--t-f-check`` (default on) compiles a fresh
``lbc_removing`` step, moves it past ``t_f`` and counts the recompiles that follow, with their reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from step_time import VARIANTS, checked_device, checked_variants, make_step, parse_setting
from torch import nn
from torch._dynamo.utils import counters

_RECOMPILES_LOG = "torch._dynamo.guards.__recompiles"
_ISOLATE = "isolate_recompiles" in inspect.signature(torch.compile).parameters  # newer torch only


@dataclass
class Compiled:
    """One variant's compiled step and what compiling it gave."""

    name: str
    step: Callable[[], None]
    fullgraph: bool = True  # compiled with fullgraph=True (False: a graph break, compiled as the trainer would)
    graphs: int = 0  # graphs compiled at the first step
    compile_s: float = 0.0  # wall time of the first step (tracing and compiling)
    breaks: list[str] = field(default_factory=list)  # explain's break reasons, "reason (file:line)"
    recompiles: list[str] = field(default_factory=list)  # dynamo's reasons for graphs compiled after the first step
    error: str | None = None  # one line: why the variant could not be compiled at all


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def recompile_reasons() -> Iterator[list[str]]:
    """Collect dynamo's recompile reasons (its ``recompiles`` log) into the yielded list, printing nothing."""
    reasons: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reasons.append(" ".join(line.strip() for line in record.getMessage().splitlines()[1:]).strip())

    torch._logging.set_logs(recompiles=True)
    logger = logging.getLogger(_RECOMPILES_LOG)
    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        torch._logging.set_logs()


def graph_breaks(model: nn.Module, *inputs: Any) -> tuple[int, list[str]]:
    """``torch._dynamo.explain`` of ``model(*inputs)``: its graph count and break reasons with their source lines.

    Resets dynamo (explain does): call it before compiling anything that should stay compiled.
    """
    out = torch._dynamo.explain(model)(*inputs)
    reasons = []
    for r in out.break_reasons:
        frame = r.user_stack[-1] if r.user_stack else None
        where = f" ({frame.filename}:{frame.lineno})" if frame else ""
        reasons.append(f"{r.reason.strip().splitlines()[0]}{where}")
    return out.graph_count, reasons


def compile_model(model: nn.Module, backend: str, fullgraph: bool) -> nn.Module:
    """``torch.compile(model)`` as the trainer's ``Replica`` does, with ``backend`` and ``fullgraph``."""
    return torch.compile(model, backend=backend, fullgraph=fullgraph, **({"isolate_recompiles": True} if _ISOLATE else {}))


def call_from_step(step: Callable[[], None], model: nn.Module) -> None:
    """Make :func:`make_step`'s ``step`` call ``model`` (the compiled module) where it called its plain model.

    The step keeps its optimizer, method and batch; only the closure's ``model`` cell is rebound.
    """
    step.__closure__[step.__code__.co_freevars.index("model")].cell_contents = model


def compile_variant(name: str, batch: int, size: int, device: torch.device, backend: str) -> Compiled:
    """``name``'s :func:`make_step` step with its model compiled (fullgraph, else as the trainer), run once."""
    step = make_step(name, batch, size, device)
    scope = inspect.getclosurevars(step).nonlocals
    model, x = scope["model"], scope["x"]
    result = Compiled(name, step)
    call_from_step(step, compile_model(model, backend, fullgraph=True))
    before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    try:
        step()
    except torch._dynamo.exc.Unsupported as err:  # a graph break under fullgraph=True
        result.fullgraph, result.breaks = False, [_one_line(err)]
        _, result.breaks = graph_breaks(model, x)
        call_from_step(step, compile_model(model, backend, fullgraph=False))
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        step()
    except Exception as err:  # the backend failed: report it in one line, time the others
        result.error = _one_line(err)
        return result
    _sync(device)
    result.compile_s = time.perf_counter() - start
    result.graphs = counters["stats"]["unique_graphs"] - before
    return result


def time_round_robin(compiled: list[Compiled], steps: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed step of each variant (``warmup`` untimed rounds first), recompiles noted per variant."""
    times: dict[str, list[float]] = {c.name: [] for c in compiled}
    with recompile_reasons() as reasons:
        for r in range(warmup + steps):
            for c in compiled:
                graphs, logged = counters["stats"]["unique_graphs"], len(reasons)
                _sync(device)
                start = time.perf_counter()
                c.step()
                _sync(device)
                seconds = time.perf_counter() - start
                new = counters["stats"]["unique_graphs"] - graphs
                if new:
                    c.recompiles += reasons[logged:] or [f"{new} graph(s), no reason logged"]
                if r >= warmup:
                    times[c.name].append(seconds)
    return times


def t_f_recompiles(batch: int, size: int, device: torch.device, backend: str) -> dict[str, Any]:
    """A compiled ``lbc_removing`` step moved past ``t_f``: graphs compiled before and after, with the reasons."""
    variant = "lbc_removing"
    compiled = compile_variant(variant, batch, size, device, backend)
    if compiled.error:
        return {"variant": variant, "error": compiled.error}
    sp = inspect.getclosurevars(compiled.step).nonlocals["sp"]
    t_f = VARIANTS[variant][0]["t_f"]
    frozen_before = not any(p.requires_grad for p in sp.score_parameters())
    sp.update(t_f)  # one candidate left: the scores stop training (the step's own update then changes nothing)
    frozen_after = not any(p.requires_grad for p in sp.score_parameters())
    graphs = counters["stats"]["unique_graphs"]
    with recompile_reasons() as reasons:
        for _ in range(3):
            compiled.step()
    return {"variant": variant, "t_f": t_f, "graphs_first_step": compiled.graphs,
            "scores_frozen": [frozen_before, frozen_after],
            "recompiles_after_t_f": counters["stats"]["unique_graphs"] - graphs, "reasons": reasons}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (the trainer's: inductor)")
    parser.add_argument("--steps", type=int, default=15, help="timed round-robin rounds (the median is over these)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compiling step")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"from {', '.join(VARIANTS)} (dense is always measured)")
    parser.add_argument("--sizes", nargs="+", default=["16x32"], help="BATCHxSIDE settings")
    parser.add_argument("--t-f-check", action=argparse.BooleanOptionalAction, default=True,
                        help="count the recompiles of a compiled lbc step that crosses t_f")
    parser.add_argument("--json", action="store_true", help="also print every figure as one JSON line, last")
    args = parser.parse_args(argv)
    args.variants = checked_variants(parser, args.variants)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps={args.steps} --warmup={args.warmup}: use steps >= 1 and warmup >= 0")
    args.settings = [parse_setting(parser, "--sizes", setting, min_batch=2) for setting in args.sizes]  # BatchNorm
    args.device = checked_device(parser, args.device)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.variants))
    load_before = _load()
    print(f"# ResNet-18 (100 classes), compiled (backend {args.backend}, fullgraph=True), device {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} round-robin steps "
          f"after {args.warmup} warm-up; ratio = variant ms / compiled dense ms")
    print(f"# load average (1, 5, 15 min) before: {' '.join(map(str, load_before))}")
    result: dict[str, Any] = {"device": str(device), "backend": args.backend, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
                              "load_before": load_before, "settings": {}}
    for batch, side in args.settings:
        torch._dynamo.reset()
        compiled = [compile_variant(v, batch, side, device, args.backend) for v in args.variants]
        ok = [c for c in compiled if c.error is None]
        times = time_round_robin(ok, args.steps, args.warmup, device) if ok and ok[0].name == "dense" else {}
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n## batch {batch} x {side}x{side}\n")
        print("| variant | fullgraph | graphs | recompiles | compile s | median ms | ratio to dense |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        rows: dict[str, Any] = {}
        for c in compiled:
            ms = medians.get(c.name)
            ratio = ms / medians["dense"] if ms is not None else None
            rows[c.name] = {"fullgraph": c.fullgraph and c.error is None, "graphs": c.graphs,
                            "recompiles": len(c.recompiles), "recompile_reasons": c.recompiles, "breaks": c.breaks,
                            "compile_s": c.compile_s, "error": c.error,
                            "median_ms": None if ms is None else ms * 1e3, "ratio": ratio,
                            "step_ms": [t * 1e3 for t in times.get(c.name, [])]}
            if c.error:
                print(f"| {c.name} | failed: {c.error} | | | | | |")
                continue
            print(f"| {c.name} | {'yes' if c.fullgraph else 'no'} | {c.graphs} | {len(c.recompiles)} | "
                  f"{c.compile_s:.1f} | {'-' if ms is None else f'{ms * 1e3:.1f}'} | "
                  f"{'-' if ratio is None else f'{ratio:.3f}'} |")
        for c in compiled:
            for reason in c.breaks:
                print(f"# {c.name}: graph break: {reason}")
            for reason in c.recompiles:
                print(f"# {c.name}: recompiled: {reason}")
        result["settings"][f"{batch}x{side}"] = rows
        del compiled, ok
    if args.t_f_check:
        torch._dynamo.reset()
        batch, side = args.settings[0]
        check = t_f_recompiles(batch, side, device, args.backend)
        result["t_f_check"] = check
        if "error" in check:
            print(f"\n# t_f check: {check['variant']} failed to compile: {check['error']}")
        else:
            print(f"\n# t_f check ({check['variant']}, batch {batch} x {side}): scores frozen before/after "
                  f"update(t_f={check['t_f']:g}): {check['scores_frozen']}; graphs at the first step "
                  f"{check['graphs_first_step']}, recompiles after t_f {check['recompiles_after_t_f']}")
            for reason in check["reasons"]:
                print(f"#   reason: {reason}")
    result["load_after"] = _load()
    print(f"# load average (1, 5, 15 min) after: {' '.join(map(str, result['load_after']))}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# One prepared check of lbc on a briefly lent GPU machine (docs/gpu_check.md): the CUDA tests, the benchmarks
# and a 1-process nccl run of each task, each under its own timeout inside one budget, into one report.
#
#   bash scripts/gpu_check.sh --prepare [--dry-run]   # here (PyPI): wheels the GPU image lacks, into .whl/
#   bash scripts/gpu_check.sh --dry-run               # here: every command exists, parses, composes; runs none
#   bash scripts/gpu_check.sh                          # there (carry .whl): install .whl/, run, write the report
#
# The report is $OUT/gpu_report.md (./gpu_report.md without OUT), the raw logs $OUT/gpu_logs.txt. A step that
# fails or runs out of time is recorded with the end of its log and the next one runs.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds for all steps, 450), GPU_CHECK_WORK (run
# dirs and logs, /tmp/gpu_check), GPU_CHECK_SITE (where the wheels are installed, /tmp/site),
# GPU_CHECK_BENCHMARKS (the benchmarks' folder, benchmarks), GPU_CHECK_ROOT (the repo, this script's parent).
set -uo pipefail

ROOT=${GPU_CHECK_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BENCH=${GPU_CHECK_BENCHMARKS:-benchmarks}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/site}
BUDGET=${GPU_CHECK_BUDGET:-450}
REPORT_DIR=${OUT:-.}

# --- what runs: one definition for the run and the dry run -------------------------------------------------
# Wheels the GPU image lacks (its package list: /work/.library/device/KINDS.md), at requirements.txt's pins.
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)
# lbc's own needs that the image already has (the dry run checks pyproject's dependencies against both lists).
IMAGE_HAS=(torch torchvision timm pyyaml numpy pillow scikit-learn tensorboard tqdm safetensors packaging
           pytest transformers tokenizers accelerate onnx onnxscript onnxruntime)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

PYTEST_PATHS=(tests/gpu)
PYTEST=(-m pytest -q -p no:cacheprovider -m cuda "${PYTEST_PATHS[@]}")
TORCHRUN=(-m lbc.cli.torchrun --standalone --nproc_per_node=1)
# Tiny schedules (tests/helpers.py's TINY, tests/lm/test_runner.py's TINY_LM, tests/detection/test_runner.py's
# TINY), on the GPU: under lbc-torchrun the process group is nccl (lbc/run/distributed.py).
CLS=(trainer=smoke schedule.epochs=2 schedule.warmup_epochs=0 data.loader.batch_size=16 data.loader.workers=0
     trainer.device=cuda trainer.amp=bf16)
LM=(task=lm model=llama_tiny schedule.steps=6 schedule.warmup_steps=1 optim.lr=3e-3 data.seq_len=32 data.batch_size=4
    data.max_eval_windows=4 data.calibration_sequences=8 trainer.progress=false trainer.ckpt_interval=2
    trainer.device=cuda trainer.amp=bf16 sparsity.t_f=3)
DET=(task=detection data.train_images=8 data.val_images=4 data.image_size=64 data.batch_size=4 data.val_batch_size=4
     schedule.epochs=2 schedule.milestones=[1] schedule.warmup_iters=2 trainer.log_interval=1 trainer.progress=false
     trainer.device=cuda)
B_STEP=("$BENCH/step_time.py" --device cuda --steps 30)
B_DET=("$BENCH/det_step_time.py" --device cuda --steps 10)
B_INF=("$BENCH/inference.py" --device cuda --ort-batch-sizes --json "$WORK/inference.json")  # no onnxruntime rows
B_LM=("$BENCH/lm_step_time.py" --device cuda --json "$WORK/lm_step_time.json")
B_OPS=("$BENCH/op_count.py" --device cuda --json)  # kernel launches per training step, per method
# Seconds each step may take at most (the budget left cuts them shorter); the report needs RESERVE at the end.
declare -A CAP=([env]=40 [pytest]=200 [ddp_cls]=75 [ddp_lm]=75 [ddp_det]=120 [step_time]=90 [det_step_time]=90
                [inference]=90 [lm_step_time]=75 [op_count]=45)
RESERVE=15
# Detection runs only where mmcv's compiled ops import and were built with CUDA (mmcv builds from source:
# far too slow for a lent machine); the dry run needs only what det_step_time.py --help imports.
MMCV_PROBE='import torch, mmengine, mmdet, mmcv._ext
from mmcv.ops import get_compiling_cuda_version as v
assert torch.cuda.is_available() and v() not in ("", "not available"), f"mmcv ops built with CUDA {v()}"'
MMDET_PROBE='import mmcv, mmengine, mmdet'

SNIP=$(mktemp -d)
trap 'rm -rf "$SNIP"' EXIT

# --- python snippets -----------------------------------------------------------------------------------------
cat >"$SNIP/dry.py" <<'PY'
"""The dry run's checks, in one process: groups of argv, each begun by @kind:name (see gpu_check.sh)."""
import contextlib, importlib, importlib.metadata as md, io, re, runpy, sys
from pathlib import Path

groups, passed, failed, wheel_specs = [], 0, [], []
for token in sys.argv[1:]:
    if token.startswith("@"):
        kind, _, name = token[1:].partition(":")
        groups.append((kind, name, []))
    else:
        groups[-1][2].append(token)


def report(ok, what, why=""):
    global passed
    print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {why}" if why else ""), flush=True)
    if ok:
        passed += 1
    else:
        failed.append(what)


def one_line(err):
    return " ".join(str(err).split())[:300] or type(err).__name__


def help_text(run):
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001  (an import error of the script, say)
            return 1, f"{type(e).__name__}: {one_line(e)}"
    return code, out.getvalue()


def flags_in_help(args, text):
    return [f for f in args if f.startswith("--") and not re.search(rf"(^|[\s,\[]){re.escape(f)}([\s=,\]]|$)", text)]


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    import lbc.config
    from lbc.cli.train import CONFIGS
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    lbc.config.validate(cfg)
    return cfg


def check_compose(what, overrides):
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001
        import lbc.config
        return report(False, what, one_line(lbc.config.as_config_error(e, list(overrides))))
    if cfg.trainer.device != "cuda":
        return report(False, what, f"trainer.device={cfg.trainer.device}: the GPU run must say trainer.device=cuda")
    report(True, what, f"{cfg.task.name}, {cfg.model.name} on {cfg.data.name}, sparsity {cfg.sparsity.method}, "
                       f"trainer.device={cfg.trainer.device}")


def dist_name(req):
    return re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


for kind, name, args in groups:
    if kind == "script":  # python SCRIPT ARGS: the file exists, --help exits 0 and lists every flag passed
        path, rest = Path(args[0]), args[1:]
        what = f"benchmark {path}"
        if not path.is_file():
            report(False, what, "no such file")
            continue
        sys.argv = [str(path), "--help"]
        sys.path.insert(0, str(path.parent.resolve()))  # as `python SCRIPT` has it
        code, text = help_text(lambda: runpy.run_path(str(path), run_name="__main__"))
        sys.path.pop(0)
        missing = flags_in_help(rest, text) if code == 0 else []
        if code != 0:
            report(False, what, f"--help exited {code}: {text.strip().splitlines()[-1] if text.strip() else ''}")
        elif missing:
            report(False, what, f"no flag {', '.join(missing)} in its --help")
        else:
            report(True, what, f"--help exits 0; flags {' '.join(f for f in rest if f.startswith('--')) or 'none'}")
    elif kind == "torchrun":  # python -m lbc.cli.torchrun OPTIONS OVERRIDES
        from lbc.cli import torchrun
        from torch.distributed.run import parse_args
        options, overrides = torchrun.split_argv(args)
        what = f"lbc-torchrun {name}"
        try:
            ns = parse_args([*options, "-m", "lbc.cli.train", *overrides])
        except SystemExit as e:
            report(False, what, f"torchrun refused {' '.join(options)} (exit {e.code})")
            continue
        if str(ns.nproc_per_node) != "1" or ns.training_script != "lbc.cli.train":
            report(False, what, f"nproc_per_node={ns.nproc_per_node}, script {ns.training_script}")
            continue
        check_compose(f"{what} overrides compose", overrides)
    elif kind == "module":  # python -m MODULE --help
        what = f"python -m {name} --help"
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            report(False, what, one_line(e))
            continue
        code, text = help_text(lambda: module.main(["--help"]))
        report(code == 0, what, f"exit {code}")
    elif kind == "pytest":  # the CUDA tests collect, and every test in the folder is marked cuda
        import pytest

        class Count:
            def __init__(self):
                self.items = []

            def pytest_collection_finish(self, session):
                self.items = list(session.items)

        counts = {}
        for label, marker in (("marked", ["-m", "cuda"]), ("all", [])):
            plugin = Count()
            with contextlib.redirect_stdout(io.StringIO()):
                code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *marker, *args], plugins=[plugin])
            counts[label] = (code, len(plugin.items))
        (code, marked), (_, total) = counts["marked"], counts["all"]
        report(code == 0 and marked >= 1 and marked == total, f"pytest -m cuda {' '.join(args)}",
               f"{marked} of {total} tests collected (exit {code})")
    elif kind == "wheels":  # the carried wheels: tested here, at requirements*.txt's pins, needing nothing else
        from packaging.requirements import Requirement
        target = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
        pins = {}
        for path in sorted(Path(".").glob("requirements*.txt")):
            for line in path.read_text().splitlines():
                line = line.split("#")[0].strip()
                if "==" in line:
                    pkg, version = line.split("==", 1)
                    pins[dist_name(pkg)] = version.split(",")[0].strip()
        image = {dist_name(n) for n in name.split(",") if n}
        carried = {dist_name(spec.split("==")[0]): spec.split("==")[1] for spec in args}
        wheel_specs = list(args)
        for spec in args:
            pkg, version = spec.split("==")
            problems = []
            if pins.get(dist_name(pkg), version) != version:
                problems.append(f"requirements*.txt pins {pins[dist_name(pkg)]}")
            try:
                here = md.version(pkg)
                needs = [Requirement(r) for r in md.requires(pkg) or []]
            except md.PackageNotFoundError:
                here, needs = None, []
            if here is not None and here != version:
                problems.append(f"{here} is what runs here")
            needs = [r for r in needs if r.marker is None or r.marker.evaluate(target)]
            for r in needs:
                have = carried.get(dist_name(r.name))
                if have is None and dist_name(r.name) not in image:
                    problems.append(f"needs {r}, neither carried nor on the image")
                elif have is not None and not r.specifier.contains(have, prereleases=True):
                    problems.append(f"needs {r}, carried {have}")
            report(not problems, f"wheel {spec}", "; ".join(problems) or
                   f"{here or 'not installed'} here, needs {', '.join(str(r) for r in needs) or 'nothing'}")
        try:
            import tomllib
            deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
        except ImportError:  # python < 3.11: the list is one "dependencies = [...]" block
            block = re.search(r"^dependencies = \[(.*?)^\]", Path("pyproject.toml").read_text(), re.S | re.M).group(1)
            deps = re.findall(r'"([^"]+)"', block)
        lacking = [d for d in deps if dist_name(d) not in carried and dist_name(d) not in image]
        report(not lacking, "pyproject dependencies on the GPU machine",
               f"neither carried nor on the image: {', '.join(lacking)}" if lacking
               else f"all {len(deps)} carried or on the image")
    elif kind == "carried":  # the files in .whl/: one wheel of each carried version, and no other
        for spec in wheel_specs:
            pkg, version = spec.split("==")
            prefix = f"{pkg.replace('-', '_').lower()}-"
            same = [f for f in args if f.lower().startswith(prefix)]
            right = [f for f in same if f.lower().startswith(f"{prefix}{version}-") and f.endswith(".whl")]
            report(len(right) == 1 and len(same) == 1, f".whl/ holds {spec}",
                   f"found {', '.join(same) or 'nothing'}" + ("" if right else ": run --prepare"))
    elif kind == "skip":
        print(f"skip {name}: {' '.join(args)}")
    else:
        report(False, f"@{kind}", "unknown check kind")

if failed:
    print(f"gpu_check --dry-run: {len(failed)} of {passed + len(failed)} checks failed: {', '.join(failed)}")
    sys.exit(1)
print(f"gpu_check --dry-run: {passed} checks passed")
PY

cat >"$SNIP/env.py" <<'PY'
"""The machine as torch sees it, printed and written to env.json (argv[1])."""
import importlib.metadata as md, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
for pkg in ("torchvision", "timm", "transformers", "hydra-core", "omegaconf", "mmcv", "mmdet", "mmengine"):
    try:
        info[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
        info[pkg] = None
if torch.cuda.is_available():
    from lbc.accelerate import backend_name, hardware_reason
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())), sparse_2_4=hardware_reason() or "available",
                sparse_backend=backend_name())
print(json.dumps(info, indent=1))
open(sys.argv[1], "w").write(json.dumps(info))
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: no GPU for the CUDA steps")
PY

cat >"$SNIP/report.py" <<'PY'
"""gpu_report.md from the work folder: steps.tsv, env.json, pytest.xml, the benchmarks' JSON, the runs' metrics."""
import json, re, subprocess, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

work, out, budget, bench = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
lines = []
w = lines.append


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def last_json_line(log):
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(text):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def table(header, rows):
    w("| " + " | ".join(header) + " |")
    w("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        w("| " + " | ".join("" if c is None else str(c) for c in r) + " |")
    w("")


def num(v, fmt="{:.3f}"):
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else ("-" if v is None else v)


skipped_tests = 0
steps = []
for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
    name, status, secs, rc, note = (line.split("\t") + [""] * 5)[:5]
    steps.append(dict(name=name, status=status, secs=secs, rc=rc, note=note))
status = {s["name"]: s for s in steps}
try:  # a skipped CUDA test on the GPU machine: say so beside the pytest step too
    early = ET.parse(work / "pytest.xml").getroot()
    skipped = sum(int(x.get("skipped", 0)) for x in early.iter("testsuite"))
    if skipped and "pytest" in status:
        status["pytest"]["note"] = f"{skipped} of {sum(int(x.get('tests', 0)) for x in early.iter('testsuite'))} tests skipped"
except (OSError, ET.ParseError):
    pass
env = read_json(work / "env.json") or {}
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""

w("# lbc GPU check")
w("")
w(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, commit {commit or 'unknown (no .git here)'}, budget {budget} s; "
  "produced by `bash scripts/gpu_check.sh` (docs/gpu_check.md).")
w("")
w("## Machine")
w("")
smi = (work / "nvidia-smi.txt").read_text().strip() if (work / "nvidia-smi.txt").exists() else "not available"
table(["what", "value"], [
    ["nvidia-smi (name, driver, memory)", smi],
    ["device", f"{env.get('device', '-')} (compute capability {env.get('capability', '-')}, "
               f"{env.get('memory_gib', '-')} GiB, {env.get('multiprocessors', '-')} SMs)"],
    ["torch / CUDA / cuDNN / NCCL", f"{env.get('torch')} / {env.get('cuda')} / {env.get('cudnn')} / {env.get('nccl', '-')}"],
    ["bf16 supported", env.get("bf16", "-")],
    ["2:4 sparse tensor cores", f"{env.get('sparse_2_4', '-')} ({env.get('sparse_backend', '-')})"],
    ["python / torchvision / timm / transformers", f"{env.get('python')} / {env.get('torchvision')} / "
                                                   f"{env.get('timm')} / {env.get('transformers')}"],
    ["hydra-core / omegaconf", f"{env.get('hydra-core')} / {env.get('omegaconf')}"],
    ["detection (mmcv with CUDA ops)", (work / "mmcv.txt").read_text().strip() if (work / "mmcv.txt").exists() else "-"],
])

w("## Steps")
w("")
table(["step", "status", "seconds", "exit", "note"], [[s["name"], s["status"], s["secs"], s["rc"], s["note"]] for s in steps])

w("## CUDA tests (`pytest -m cuda tests/gpu`)")
w("")
try:
    suite = ET.parse(work / "pytest.xml").getroot()
    rows = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {' '.join((node.get('message') or '').split())[:150]}"
        rows.append([case.get("name"), outcome, num(float(case.get("time", 0)), "{:.1f}")])
    counts = {k: sum(int(s.get(k, 0)) for s in suite.iter("testsuite")) for k in ("tests", "failures", "errors", "skipped")}
    w(f"{counts['tests']} tests: {counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
      f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped.")
    if counts["skipped"]:
        skipped_tests = counts["skipped"]
        w("")
        w(f"**{counts['skipped']} CUDA tests were skipped**: on a GPU machine none should be (see their reasons below).")
    w("")
    table(["test", "outcome", "seconds"], rows)
except (OSError, ET.ParseError):
    w("No results (pytest did not write its report).")
    w("")

w("## Training runs under lbc-torchrun (1 process, nccl)")
w("")
rows = []
for name, metric in (("ddp_cls", "top1"), ("ddp_lm", "ppl"), ("ddp_det", "coco/bbox_mAP")):
    if name not in status:
        continue
    log = (work / "logs" / f"{name}.log").read_text(errors="replace") if (work / "logs" / f"{name}.log").exists() else ""
    start = next((m.group(0) for m in re.finditer(r"lbc: .*process\(es\)", log)), "-")
    device = re.search(r"(cuda(:\d+)?|cpu), (\d+) process\(es\)", start)
    nccl = "yes" if re.search(r"NCCL INFO|ProcessGroupNCCL|NCCL version", log) else "not seen in the log"
    record = {}
    metrics = work / "runs" / name / "metrics.jsonl"
    if metrics.exists() and metrics.read_text().strip():
        record = json.loads(metrics.read_text().strip().splitlines()[-1])
    value = next((record[k] for k in record if k == metric or k.endswith(metric)), None)
    rows.append([name, status[name]["status"], device.group(0) if device else "-", nccl,
                 num(record.get("sparsity/exact_nm")), num(record.get("sparsity/density")), f"{metric} {num(value)}"])
table(["run", "status", "device, processes", "nccl", "exact N:M", "density", "last record"], rows)


def dtype_note(script):
    try:
        src = (bench / script).read_text()
    except OSError:
        return "-"
    return "float32 (the script uses no autocast)" if "autocast" not in src else "as the script's autocast says"


def variant_rows(variants, ms_key):
    return [[v, num(d.get(ms_key, d.get("ms")), "{:.2f}"), num(d.get("ratio"))] + [num(d.get(k)) for k in ("target", "met")
            if any(k in x for x in variants.values())] for v, d in variants.items()]


w("## Benchmarks")
w("")
w("Ratios are variant / dense of the same run (< 1: faster). A benchmark that did not finish has no table.")
w("")
data = last_json_line(work / "logs" / "step_time.log")
w(f"### benchmarks/step_time.py: ResNet-18 training step ({status.get('step_time', {}).get('status', 'not run')})")
w("")
if isinstance(data, dict):
    w(f"device {data.get('device')}, median of {data.get('steps')} round-robin steps, dtype {dtype_note('step_time.py')}; "
      f"one LBC schedule update on ResNet-50: {num(data.get('lbc_update_resnet50_ms'), '{:.1f}')} ms")
    w("")
    for setting, variants in data.items():
        if isinstance(variants, dict) and all(isinstance(v, dict) and "ratio" in v for v in variants.values()):
            batch, _, side = setting.partition("x")
            w(f"batch {batch} x {side}x{side}:")
            w("")
            table(["variant", "ms/step", "x dense"], variant_rows(variants, "ms"))
elif "step_time" in status:
    w("no JSON line in its log")
    w("")
ops_log = work / "logs" / "op_count.log"
w(f"### benchmarks/op_count.py: kernel launches per training step ({status.get('op_count', {}).get('status', 'not run')})")
w("")
if ops_log.exists():  # the script prints its own Markdown table (and a JSON line, left to the logs)
    lines = [line for line in ops_log.read_text().splitlines() if line.startswith(("# ", "|"))]
    w("\n".join(line.removeprefix("# ") for line in lines) if lines else "no table in its log")
    w("")

data = last_json_line(work / "logs" / "det_step_time.log")
w(f"### benchmarks/det_step_time.py: Faster R-CNN training step ({status.get('det_step_time', {}).get('status', 'not run')})")
w("")
if isinstance(data, dict) and isinstance(data.get("variants"), dict):
    w(f"{data.get('config')}, batch {data.get('batch')} x {data.get('size')}x{data.get('size')}, device {data.get('device')}, "
      f"median of {data.get('steps')} steps, dtype {dtype_note('det_step_time.py')}")
    w("")
    table(["variant", "ms/step", "x dense", "cpu min ms", "cpu x dense"],
          [[v, num(d.get("ms"), "{:.1f}"), num(d.get("ratio")), num(d.get("cpu_min_ms"), "{:.1f}"), num(d.get("cpu_ratio"))]
           for v, d in data["variants"].items()])
else:
    w(status.get("det_step_time", {}).get("note") or "no results")
    w("")

data = read_json(work / "inference.json")
w(f"### benchmarks/inference.py: dense vs exported 2:4 vs lbc.accelerate ({status.get('inference', {}).get('status', 'not run')})")
w("")
if isinstance(data, list) and data:
    table(["model", "backend", "dtype", "batch", "dense ms", "2:4 ms", "2:4 ratio", "accel ms", "accel ratio", "accel max abs diff"],
          [[r.get("model"), r.get("backend"), r.get("dtype"), r.get("batch"), num(r.get("dense_ms"), "{:.2f}"),
            num(r.get("exported_ms"), "{:.2f}"), num(r.get("exported_ratio")), num(r.get("accelerated_ms"), "{:.2f}"),
            num(r.get("accelerated_ratio")), num(r.get("accelerated_max_abs_diff"), "{:.2e}")] for r in data])
else:
    w("no results")
    w("")

data = read_json(work / "lm_step_time.json")
w(f"### benchmarks/lm_step_time.py: causal-LM training step ({status.get('lm_step_time', {}).get('status', 'not run')})")
w("")
if isinstance(data, dict) and isinstance(data.get("variants"), dict):
    w(f"model {data.get('model')} ({num(data.get('params'), '{:,}')} parameters), batch {data.get('batch')} x "
      f"{data.get('seq_len')} tokens, device {data.get('device')}, median of {data.get('steps')} steps after "
      f"{data.get('warmup')}, dtype {dtype_note('lm_step_time.py')}")
    w("")
    table(["variant", "median ms", "x dense", "target", "met"],
          [[v, num(d.get("median_ms"), "{:.2f}"), num(d.get("ratio")), num(d.get("target")), num(d.get("met"))]
           for v, d in data["variants"].items()])
    for name, why in (data.get("skipped") or {}).items():
        w(f"- {name} skipped: {why}")
    w("")
else:
    w("no results")
    w("")

bad = [s for s in steps if s["status"] not in ("OK", "SKIPPED")]
if bad:
    w("## Failures: the end of each log")
    w("")
    for s in bad:
        log = work / "logs" / f"{s['name']}.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else ["(no log)"]
        w(f"### {s['name']}: {s['status']} after {s['secs']} s (exit {s['rc']})")
        w("")
        w("```")
        lines.extend(tail)
        w("```")
        w("")
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(3 if skipped_tests else 0)  # a CUDA test skipped on the GPU machine is a failed check
PY

have_wheel() {  # have_wheel NAME==VERSION: its wheel is in .whl/ (file names spell - as _)
  local n=${1%%==*} v=${1#*==}
  ls .whl/ 2>/dev/null | grep -qi "^${n//-/_}-${v}-.*\.whl$"
}

# --- --prepare ------------------------------------------------------------------------------------------------
prepare() {  # the wheels into .whl/ (binary for cp312 manylinux x86_64; a pure-python sdist built into a wheel)
  local dry=$1 spec name
  local plat=() p
  for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  if ! git check-ignore -q .whl/x.whl 2>/dev/null; then
    if [[ $dry == 1 ]]; then echo "would add /.whl/ to .git/info/exclude"
    else mkdir -p .git/info && echo /.whl/ >>.git/info/exclude && echo "ignore: /.whl/ added to .git/info/exclude"
    fi
  fi
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    local get=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
               "${plat[@]}" -d .whl "$spec")
    local build=("$PY" -m pip wheel -q --no-deps -w .whl "$spec")
    if [[ $dry == 1 ]]; then
      echo "would run: ${get[*]}"
      echo "   or, for a source-only pure-python release: ${build[*]}"
      continue
    fi
    mkdir -p .whl
    local norm=${name//-/_}
    find .whl -maxdepth 1 -iname "${norm}-*.whl" ! -iname "${norm}-${spec#*==}-*" -print -delete  # one version each
    if have_wheel "$spec"; then echo "have $spec"; continue; fi
    if ! "${get[@]}" 2>/dev/null; then
      "${build[@]}" || { echo "error: could not get a wheel of $spec" >&2; return 1; }
      if ! ls .whl/ | grep -qi "^${norm}-${spec#*==}-py3-none-any.whl$"; then
        echo "error: $spec built a platform wheel here; it would not run on the GPU machine" >&2
        return 1
      fi
    fi
    echo "got $spec"
  done
  [[ $dry == 1 ]] || { ls -l .whl; du -sh .whl; }
}

# --- --dry-run ------------------------------------------------------------------------------------------------
dry_run() {
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  local det=(@skip:det_step_time "mmdet is not importable here, and det_step_time.py imports it before --help")
  if "$PY" -c "$MMDET_PROBE" 2>/dev/null; then det=(@script:det_step_time "${B_DET[@]}"); fi
  local image
  image=$(IFS=,; echo "${IMAGE_HAS[*]}")
  local carried=(@skip:.whl "no .whl/ here: run bash scripts/gpu_check.sh --prepare before the device run")
  [[ -d .whl ]] && carried=(@carried:.whl $(ls .whl))
  "$PY" "$SNIP/dry.py" \
    "@wheels:$image" "${WHEELS[@]}" \
    "${carried[@]}" \
    @pytest:cuda "${PYTEST_PATHS[@]}" \
    @module:lbc.cli.torchrun \
    @torchrun:classification "${TORCHRUN[@]:2}" "${CLS[@]}" "run_dir=$WORK/runs/ddp_cls" \
    @torchrun:lm "${TORCHRUN[@]:2}" "${LM[@]}" "run_dir=$WORK/runs/ddp_lm" \
    @torchrun:detection "${TORCHRUN[@]:2}" "${DET[@]}" "run_dir=$WORK/runs/ddp_det" \
    @script:step_time "${B_STEP[@]}" \
    "${det[@]}" \
    @script:inference "${B_INF[@]}" \
    @script:lm_step_time "${B_LM[@]}" \
    @script:op_count "${B_OPS[@]}"
}

# --- the run on the GPU machine -------------------------------------------------------------------------------
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$WORK/steps.tsv"; }

step() {  # step NAME CMD...: CMD under min(its CAP, the budget left), its output in logs/NAME.log
  local name=$1; shift
  local cap=${CAP[$name]:-60} left=$((DEADLINE - SECONDS - RESERVE))
  local limit=$(( cap < left ? cap : left )) log="$WORK/logs/$name.log"
  if (( limit < 15 )); then
    record "$name" SKIPPED 0 - "out of time: the ${BUDGET} s budget was spent"
    echo "== $name: SKIPPED (out of time)"
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  echo "\$ $*" >"$log"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0)) state=OK note=""
  if (( rc == 124 || rc == 137 )); then state=TIMEOUT; note="stopped at its ${limit} s limit"
  elif (( rc != 0 )); then state=FAILED; note=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '\t|' '  ' | cut -c1-160)
  fi
  record "$name" "$state" "$secs" "$rc" "$note"
  echo "   $state in ${secs} s${note:+: $note}"
}

skip() { record "$1" SKIPPED 0 - "$2"; echo "== $1: SKIPPED ($2)"; }

run_all() {
  DEADLINE=$((SECONDS + BUDGET))
  rm -rf "$WORK/logs" "$WORK/runs" "$WORK/data" "$WORK/steps.tsv" "$WORK"/*.json "$WORK"/*.txt "$WORK/pytest.xml"
  mkdir -p "$WORK/logs" "$WORK/runs" "$REPORT_DIR" || exit 2
  export PYTHONUNBUFFERED=1 LBC_DATA="$WORK/data" MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  # 0. the carried wheels
  local missing=() spec
  for spec in "${WHEELS[@]}"; do have_wheel "$spec" || missing+=("$spec"); done
  if ls .whl/*.whl >/dev/null 2>&1; then
    CAP[wheels]=60
    step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  ((${#missing[@]})) && record wheels-missing FAILED 0 - "not in .whl/: ${missing[*]} (run --prepare here, carry .whl)"
  # 1. the machine
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$WORK/nvidia-smi.txt" 2>&1 \
    || echo "nvidia-smi failed: $(head -c 200 "$WORK/nvidia-smi.txt")" >"$WORK/nvidia-smi.txt"
  step env "$PY" "$SNIP/env.py" "$WORK/env.json"
  local mmcv=0
  if "$PY" -c "$MMCV_PROBE" >"$WORK/mmcv.log" 2>&1; then mmcv=1; echo "installed" >"$WORK/mmcv.txt"
  else echo "detection skipped: mmcv with CUDA ops not installed ($(tail -n 1 "$WORK/mmcv.log" | tr '|' ' ' | cut -c1-120))" >"$WORK/mmcv.txt"
  fi
  # 2. the CUDA tests
  step pytest "$PY" "${PYTEST[@]}" --junitxml="$WORK/pytest.xml"
  # 3. one process of each task under lbc-torchrun (nccl); NCCL's init lines show the backend in the log
  local nccl=(env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT)
  step ddp_cls "${nccl[@]}" "$PY" "${TORCHRUN[@]}" "${CLS[@]}" "run_dir=$WORK/runs/ddp_cls"
  step ddp_lm "${nccl[@]}" "$PY" "${TORCHRUN[@]}" "${LM[@]}" "run_dir=$WORK/runs/ddp_lm"
  if ((mmcv)); then step ddp_det "${nccl[@]}" "$PY" "${TORCHRUN[@]}" "${DET[@]}" "run_dir=$WORK/runs/ddp_det"
  else skip ddp_det "detection skipped: mmcv with CUDA ops not installed"
  fi
  # 4. the benchmarks (after the runs: a slow benchmark must not cost the correctness checks their time)
  step step_time "$PY" "${B_STEP[@]}"
  if ((mmcv)); then step det_step_time "$PY" "${B_DET[@]}"
  else skip det_step_time "detection skipped: mmcv with CUDA ops not installed"
  fi
  step inference "$PY" "${B_INF[@]}"
  step lm_step_time "$PY" "${B_LM[@]}"
  step op_count "$PY" "${B_OPS[@]}"
  # 5. the report and the raw logs
  "$PY" "$SNIP/report.py" "$WORK" "$REPORT_DIR/gpu_report.md" "$BUDGET" "$BENCH"
  local report_rc=$?
  ((report_rc == 3)) && echo "gpu_check: some CUDA tests were skipped (see the report)" >&2
  ((report_rc != 0 && report_rc != 3)) && echo "error: the report failed (exit $report_rc)" >&2
  local name
  for name in $(cut -f1 "$WORK/steps.tsv"); do  # in the order they ran
    [[ -f $WORK/logs/$name.log ]] || continue
    echo "=================== $name"
    tail -n 4000 "$WORK/logs/$name.log"
  done >"$REPORT_DIR/gpu_logs.txt"
  echo "gpu_check: report $REPORT_DIR/gpu_report.md, logs $REPORT_DIR/gpu_logs.txt"
  ((report_rc == 0)) && ! awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT" {bad = 1} END {exit !bad}' "$WORK/steps.tsv"
}

case "${1:-}" in
  --prepare) prepare "$([[ ${2:-} == --dry-run ]] && echo 1 || echo 0)" ;;
  --dry-run) dry_run ;;
  "") run_all ;;
  *) echo "usage: bash scripts/gpu_check.sh [--prepare [--dry-run] | --dry-run]" >&2; exit 2 ;;
esac

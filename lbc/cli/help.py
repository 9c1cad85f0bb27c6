"""``lbc-train --help``: usage, the common commands, every config group with its options, where to read more.

Built from the packaged config directory (``lbc/configs``) by listing its YAML files, so a new option
file shows up without editing this module; with ``--config-dir DIR`` the user's files are listed too.
It imports only the standard library and PyYAML: the help prints in a fraction of a second, without
torch, timm or Hydra (``lbc.cli.train.main`` answers ``--help`` before it imports those).

Not listed: the schemas Hydra's ConfigStore holds as ``<group>/base_<option>`` (option files extend
them; they are not choices on their own), the helper folders ``train.yaml`` merges into a group
(``optional schedule/for_data@schedule: ...``), and Hydra's own ``hydra`` group (``--hydra-help``).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HELP_FLAGS = ("-h", "--help")
SUMMARISE_OVER = 24  # a group with more options than this (experiment's nested presets) shows counts per folder
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_KEEP = "\u00a0"  # a space the wrapping does not break at (printed as a plain space)

USAGE = "usage: lbc-train [flags] [key=value ...]        (flags first, then the overrides)"

ABOUT = ("Train an N:M sparse model (LBC, SR-STE, ASP, dense; one-shot magnitude, Wanda, SparseGPT) as the "
         "Hydra config says: lbc/configs/train.yaml picks one option of each group below; group=option "
         "picks another, key=value changes one value. A bad value stops with one line 'error: ...' and "
         "exit status 2.")

# (command, what it does); {default} is filled from train.yaml's defaults list
COMMANDS: tuple[tuple[str, str], ...] = (
    ("lbc-train", "the default job: {default}"),
    ("lbc-train optim.lr=0.05 sparsity=srste sparsity.pattern=1:4",
     "change values (key=value) and options (group=option)"),
    ("lbc-train task=detection", "another task: MMDetection models (pip install -e '.[det]'); task=lm: "
     "language models (pip install -e '.[lm]')"),
    ("lbc-train experiment=table1/resnet50_lbc_2x4 data.root=/data/imagenet",
     "a paper preset (experiment group below): it sets several groups; you give the data"),
    ("lbc-train run_dir=outputs/my_run", "resume: the same run_dir again continues from its last.pt"),
    ("lbc-train --cfg job sparsity=srste", "print the composed config (every key and value); runs nothing"),
    ("lbc-train -m sparsity.pattern=2:4,1:4", "multirun: one job per value (a sweep, under multirun/)"),
    ("lbc-torchrun --nproc_per_node=8 model=resnet50 data=imagenet data.root=/data/imagenet",
     "many GPUs (DDP): torchrun's options, then lbc-train's; see lbc-torchrun --help"),
)

# Hydra's flags (hydra._internal.utils.get_args_parser) a user needs; --hydra-help lists them all
FLAGS: tuple[tuple[str, str], ...] = (
    ("-h, --help", "this help (with --config-dir DIR: DIR's option files too)"),
    ("-c, --cfg job|hydra|all", "print the composed config instead of running (--resolve: with ${...} resolved)"),
    ("-m, --multirun", "one job per combination of the comma-separated values"),
    ("-cd, --config-dir DIR", "add your config directory: DIR/<group>/<option>.yaml extend or replace ours"),
    ("--hydra-help", "Hydra's own help: all its flags and its groups (hydra/launcher, hydra/sweeper, ...)"),
)

MORE: tuple[tuple[str, str], ...] = (
    ("README.md", "quick start, configuration, results (in the source repository; docs/configuration.md is "
     "the reference, docs/runs.md: many GPUs, the run directory, resume)"),
    ("lbc-train --cfg job [overrides]", "what a command would run with, key by key"),
    ("lbc-train --hydra-help", "Hydra's flags and groups"),
    ("--config-dir DIR", "your own options: DIR/model/my_net.yaml is model=my_net (write it like "
     "lbc/configs/model/resnet50.yaml; docs/configuration.md says how)"),
    ("HYDRA_FULL_ERROR=1", "Hydra's full stack trace instead of the one-line error"),
)


def wants_help(argv: Sequence[str]) -> bool:
    """``-h`` or ``--help`` among the arguments (a key=value override is never one)."""
    return any(arg in HELP_FLAGS for arg in argv)


def config_dir(argv: Sequence[str]) -> Path | None:
    """The directory of ``--config-dir DIR`` / ``--config-dir=DIR`` / ``-cd DIR`` on the command line, if any."""
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(argv):
                return Path(argv[i + 1])
            if arg.startswith(flag + "="):
                return Path(arg[len(flag) + 1:])
    return None


def _load(path: Path) -> dict[str, Any]:
    """A YAML file as a mapping ({} when it is empty, not a mapping, or does not parse: the help still prints)."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _entries(path: Path) -> list[tuple[str, str | None]]:
    """A config file's defaults list as (target, value) pairs, the ``optional``/``override`` keywords
    and a leading ``/`` dropped: ``override /model: resnet50`` is ("model", "resnet50")."""
    entries = _load(path).get("defaults")
    pairs: list[tuple[str, str | None]] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue  # "_self_", "base_train", "/experiment/recipe/x": not a group choice
        ((key, value),) = entry.items()
        words = str(key).split()
        pairs.append((words[-1].lstrip("/") if words else "", None if value is None else str(value)))
    return pairs


def helper_folders(configs: Path = CONFIGS) -> set[str]:
    """The folders ``train.yaml`` merges into a group (``optional sparsity/for_task@sparsity: ...``):
    ``{"sparsity/for_task", ...}``. They are picked for you, never chosen on the command line."""
    return {target.split("@")[0] for target, _ in _entries(configs / "train.yaml")
            if "/" in target.split("@")[0] and not target.startswith("hydra/")}


def defaults(configs: Path = CONFIGS) -> dict[str, str | None]:
    """Each group's default option in ``train.yaml``'s defaults list (None: nothing, as ``experiment: null``)."""
    return {target: value for target, value in _entries(configs / "train.yaml")
            if "/" not in target and "@" not in target}


def task_defaults(configs: Path = CONFIGS) -> dict[str, dict[str, str]]:
    """What each task option picks instead of train.yaml's defaults (``override /model: ...`` in task/*.yaml)."""
    return {path.stem: {target: value for target, value in _entries(path) if value is not None and "@" not in target}
            for path in sorted((configs / "task").glob("*.yaml"))}


def groups(configs: Path = CONFIGS, hidden: set[str] | None = None) -> dict[str, list[str]]:
    """group -> its options, read from the YAML files under ``configs/<group>/`` (nested ones as
    ``folder/name``, as Hydra names them); Hydra's ``hydra`` group and the ``hidden`` folders left out."""
    hidden = helper_folders(configs) if hidden is None else hidden
    found: dict[str, list[str]] = {}
    for folder in sorted(p for p in configs.iterdir() if p.is_dir() and p.name != "hydra") if configs.is_dir() else []:
        options = []
        for path in sorted(folder.rglob("*.yaml")):
            rel = path.relative_to(configs).with_suffix("").as_posix()
            if not any(rel.startswith(h + "/") for h in hidden):
                options.append(rel.split("/", 1)[1])
        if options:
            found[folder.name] = options
    return found


def _width() -> int:
    return max(72, min(shutil.get_terminal_size((100, 24)).columns, 110))


def _rows(pairs: Sequence[tuple[str, str]], width: int, indent: int = 2) -> list[str]:
    """``name  what`` rows, the names in one column; a long name puts its text on the next line."""
    col = min(max(len(name) for name, _ in pairs) + 3, 34)
    lines = []
    for name, what in pairs:
        pad = " " * (indent + col)
        first = f"{' ' * indent}{name}"
        if len(name) + 3 > col:
            lines.append(first)
            first = pad
        else:
            first = first.ljust(indent + col)
        lines += textwrap.wrap(what, width, initial_indent=first, subsequent_indent=pad,
                               break_long_words=False, break_on_hyphens=False)
    return [line.replace(_KEEP, " ") for line in lines]


def _summary(options: list[str]) -> str:
    """Many (nested) options as a count, the top-level ones by name and each folder with its count."""
    top = [o for o in options if "/" not in o]
    folders: dict[str, int] = {}
    for o in options:
        if "/" in o:
            folders[o.split("/")[0]] = folders.get(o.split("/")[0], 0) + 1
    parts = top + [f"{name}/{_KEEP}({count})" for name, count in sorted(folders.items())]
    return f"{len(options)} options: {', '.join(parts)}"


def _example(options: list[str]) -> str:
    """A nested option to show (the first of the first folder), so the example always exists."""
    return next((o for o in options if "/" in o), options[0])


def _describe(options: list[str], default: str | None, in_defaults: bool, folder: Path) -> str:
    """One group's options, the default first; a long nested list as counts (and where to list the names)."""
    if len(options) > SUMMARISE_OVER:
        text = (f"{_summary(options)}; pick one by its path, e.g. {folder.name}={_example(options)} "
                f"(list them: ls -R {folder})")
    else:
        text = ", ".join(f"{o} (default)" if o == default else o
                         for o in sorted(options, key=lambda o: (o != default, o)))
    if in_defaults and default is None:
        text = f"none by default; {text}"
    return text


def render(configs: Path = CONFIGS, user_dir: Path | None = None, width: int | None = None) -> str:
    """The whole help text: usage, commands, flags, the groups of ``configs`` (and of ``user_dir``), more."""
    width = width or _width()
    primary = user_dir / "train.yaml" if user_dir is not None and (user_dir / "train.yaml").is_file() else None
    picked = defaults(primary.parent) if primary else defaults(configs)
    hidden = helper_folders(configs) | (helper_folders(primary.parent) if primary else set())
    ours = groups(configs, hidden)
    mine = groups(user_dir, hidden) if user_dir is not None else {}
    default_job = " ".join(f"{g}={picked[g]}" for g in ("task", "model", "data", "sparsity") if picked.get(g))

    out = [USAGE, "", *textwrap.wrap(ABOUT, width), "", "Commands:"]
    out += _rows([(cmd, what.format(default=default_job or "train.yaml's defaults")) for cmd, what in COMMANDS], width)
    out += ["", "Flags (before the overrides; Hydra's, --hydra-help lists them all):"]
    out += _rows(FLAGS, width)
    out += ["", f"Config groups (group=option; {configs}):"]
    order = [g for g in picked if g in ours or g in mine]  # train.yaml's order, then the rest by name
    names = order + sorted(set(ours) - set(order)) + sorted(set(mine) - set(ours) - set(order))
    rows = []
    for group in names:
        if group in ours:
            rows.append((group, _describe(ours[group], picked.get(group), group in picked, configs / group)))
        if group in mine:
            assert user_dir is not None
            text = _describe(mine[group], picked.get(group), group in picked and group not in ours, user_dir / group)
            replaced = sorted(set(mine[group]) & set(ours.get(group, [])))
            text += f" ({', '.join(replaced)}: replace lbc's)" if replaced else ""
            text += "" if group in picked else f" (not in the defaults list: add one with +{group}=<option>)"
            rows.append((group if group not in ours else "", f"from {user_dir}: {text}"))
    out += _rows(rows, width)
    overrides = {task: picks for task, picks in task_defaults(configs).items() if picks}
    if overrides:
        out += ["", "A task changes the defaults:"]
        out += _rows([(f"task={task}", " ".join(f"{g}={o}" for g, o in picks.items()))
                      for task, picks in overrides.items()], width)
    if user_dir is not None and not user_dir.is_dir():
        out += ["", f"note: --config-dir {user_dir} is not a directory: Hydra will refuse it"]
    elif primary is not None:
        out += ["", f"note: {primary} replaces lbc's train.yaml: the defaults above are its"]
    out += ["", "More:"]
    out += _rows(MORE, width)
    return "\n".join(out) + "\n"


def print_help(argv: Sequence[str]) -> None:
    """Print the help for this command line (its ``--config-dir``, if any) on stdout."""
    print(render(user_dir=config_dir(argv)), end="", flush=True)

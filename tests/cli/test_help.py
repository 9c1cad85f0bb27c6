"""``lbc-train --help`` is ours: the commands, every group and option of lbc/configs (read from its files),
no ``base_*`` schema entries, without torch; Hydra's flags still work; ``lbc-torchrun --help`` points on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lbc.cli import help as cli_help
from tests.helpers import CONFIGS, PYTHON, run_cli

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}


def console(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A console script of this venv (``lbc-train``, ``lbc-torchrun``), as a user runs it."""
    return subprocess.run([str(BIN / script), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def section(text: str, title: str) -> list[str]:
    """The lines under the heading that starts with ``title``, up to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def group_rows(text: str) -> dict[str, str]:
    """The ``Config groups`` section as group -> its text (its continuation lines joined)."""
    rows: dict[str, str] = {}
    group = ""
    for line in section(text, "Config groups"):
        if line[2] != " ":  # "  model        resnet_small (default), ..."
            group, line = line.split(None, 1)[0], line.split(None, 1)[1]
        rows[group] = f"{rows.get(group, '')} {line.strip()}"
    return rows


def tokens(text: str) -> set[str]:
    return set(text.replace(",", " ").replace(";", " ").split())


def expected_groups(configs: Path) -> dict[str, list[str]]:
    """What the help must list, from the files: every YAML under <group>/, Hydra's group and the folders
    train.yaml merges into a group (``optional schedule/for_data@schedule``) left out."""
    entries = yaml.safe_load((configs / "train.yaml").read_text())["defaults"]
    keys = [next(iter(e)).split()[-1] for e in entries if isinstance(e, dict)]
    helpers = {k.split("@")[0] for k in keys if "/" in k.split("@")[0] and not k.startswith("hydra")}
    assert {"schedule/for_data", "sparsity/for_task"} <= helpers  # the rule finds the folders it should
    found: dict[str, list[str]] = {}
    for folder in sorted(p for p in configs.iterdir() if p.is_dir() and p.name != "hydra"):
        rel = [p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml")]
        found[folder.name] = sorted(r for r in rel if not any(f"{folder.name}/{r}".startswith(h + "/") for h in helpers))
    return found


def assert_lists(rows: dict[str, str], groups: dict[str, list[str]]) -> None:
    """Each group has its row; a short one names every option, a long one (experiment) the count, its
    top-level options and each folder with its count."""
    assert set(groups) <= set(rows), set(groups) - set(rows)
    for group, options in groups.items():
        if len(options) > cli_help.SUMMARISE_OVER:
            assert f"{len(options)} options" in rows[group], (group, rows[group])
            for top in {o for o in options if "/" not in o}:
                assert top in tokens(rows[group]), (group, top)
            for folder in {o.split("/")[0] for o in options if "/" in o}:
                count = sum(o.startswith(folder + "/") for o in options)
                assert f"{folder}/ ({count})" in rows[group], (group, folder, count)
        else:
            assert set(options) <= tokens(rows[group]), (group, set(options) - tokens(rows[group]))


def test_help_lists_every_group_and_option_of_the_packaged_configs_through_the_console_script():
    proc = console("lbc-train", "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = proc.stdout
    assert text.startswith("usage: lbc-train")
    groups = expected_groups(CONFIGS)
    assert {"model", "data", "sparsity", "optim", "schedule", "trainer", "task", "experiment"} <= set(groups)
    rows = group_rows(text)
    assert_lists(rows, groups)
    assert len(groups["experiment"]) > cli_help.SUMMARISE_OVER  # summarised, not 100 lines
    assert "resnet_small (default)" in rows["model"] and "none by default" in rows["experiment"]
    # never a schema entry (base_*), Hydra's group or a helper folder's option
    assert "base_" not in text and "job_logging" not in text
    assert "for_task" not in text and "for_data" not in text and "lm_lbc" not in text and "coco_shapes_step_1x" not in text


def test_help_has_the_commands_a_newcomer_needs_and_their_options_exist():
    text = cli_help.render(width=100)
    commands = [line.split("  ")[1].strip() if line.startswith("  lbc-") else "" for line in section(text, "Commands")]
    commands = [c for c in commands if c]
    assert commands[0] == "lbc-train"  # the default job
    for needed in ("optim.lr=0.05", "sparsity=srste", "sparsity.pattern=1:4", "task=detection",
                   "experiment=table1/resnet50_lbc_2x4 data.root=", "run_dir=", "--cfg job", "-m ", "lbc-torchrun "):
        assert any(needed in c for c in commands), needed
    groups = expected_groups(CONFIGS)
    chosen = [word.split("=", 1) for c in commands for word in c.split() if word.split("=")[0] in groups]
    assert len(chosen) >= 4
    for group, option in chosen:  # the examples stay true: each group=option names a file
        assert option in groups[group], f"{group}={option}"
    assert "task=lm" in text and "--hydra-help" in text and "--config-dir" in text and "README" in text
    assert "default job: task=classification model=resnet_small data=digits sparsity=lbc" in " ".join(text.split())


def test_a_new_option_file_shows_up_and_a_helper_folder_stays_hidden(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "model" / "zz_net.yaml").write_text("defaults: [base_timm, _self_]\nname: zz\n")
    (configs / "experiment" / "zz_table").mkdir()
    (configs / "experiment" / "zz_table" / "row.yaml").write_text("# @package _global_\n")
    (configs / "sparsity" / "for_task" / "zz_hidden.yaml").write_text("t_i: 0\n")
    text = cli_help.render(configs=configs, width=100)
    rows = group_rows(text)
    assert "zz_net" in tokens(rows["model"]) and "zz_table/ (1)" in rows["experiment"]
    assert "zz_hidden" not in text
    assert_lists(rows, expected_groups(configs))


def test_help_with_a_config_dir_lists_its_files_too(tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "zz_mine.yaml").write_text("defaults: [base_timm, _self_]\nname: convnext_tiny\n")
    (mine / "model" / "resnet50.yaml").write_text("defaults: [base_resnet50, _self_]\nname: resnet50\n")
    (mine / "callbacks").mkdir()
    (mine / "callbacks" / "wandb.yaml").write_text("project: x\n")
    proc = console("lbc-train", "--config-dir", str(mine), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = group_rows(proc.stdout)
    assert f"from {mine}: resnet50, zz_mine (resnet50: replace lbc's)" in rows["model"]
    assert "resnet_small (default)" in rows["model"]  # ours still listed
    assert f"from {mine}: wandb" in rows["callbacks"] and "+callbacks=<option>" in rows["callbacks"]
    assert "zz_mine" not in console("lbc-train", "--help", cwd=tmp_path).stdout  # only when asked for
    short = console("lbc-train", f"--config-dir={mine}", "-h", cwd=tmp_path).stdout
    assert "zz_mine" in group_rows(short)["model"]


def test_help_anywhere_among_the_arguments_and_without_torch_or_hydra():
    code = ("import contextlib, io, sys\n"
            "from lbc.cli import train\n"
            "for argv in (['--help'], ['-h'], ['--cfg', 'job', '--help', 'optim.lr=0.1'], ['-m', '-h']):\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        train.main(argv)\n"
            "    assert 'Config groups' in out.getvalue(), argv\n"
            "import lbc\n"
            "print(sorted(m for m in ('torch', 'timm', 'hydra', 'omegaconf', 'lbc.config', 'lbc.engine') if m in sys.modules))\n")
    proc = subprocess.run([PYTHON, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_lbc_still_exports_its_api_lazily():
    code = ("import sys, lbc\n"
            "assert 'torch' not in sys.modules\n"
            "from lbc.accelerate import hardware_reason\n"  # binds the submodule on the package: not lbc.accelerate
            "import lbc.accelerate as acc\n"
            "from lbc.accelerate import accelerate\n"
            "assert lbc.accelerate is accelerate and acc is accelerate and callable(lbc.accelerate)\n"
            "from lbc import METHODS, NMPattern, SparsityMethod, param_groups, parse_pattern, sparsify\n"
            "assert lbc.sparsify is sparsify and lbc.parse_pattern('2:4') == NMPattern(2, 4)\n"
            "assert issubclass(METHODS.get('lbc'), SparsityMethod) and callable(param_groups)\n"
            "assert lbc.sparsity.nm.NMPattern is NMPattern\n"  # a submodule as an attribute, as before
            "assert set(lbc.__all__) <= set(dir(lbc))\n"
            "try:\n    lbc.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([PYTHON, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'lbc' has no attribute 'no_such_name'"


def test_hydras_flags_still_work():
    code, out, err = run_cli("--cfg", "job", "sparsity=srste", "optim.lr=0.05")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["optim"]["lr"] == 0.05 and cfg["sparsity"]["method"] == "srste" and cfg["model"]["name"] == "resnet_small"
    code, out, err = run_cli("--hydra-help")
    assert code == 0 and "Hydra" in out and "hydra/launcher" in out, err


def test_lbc_torchrun_help_says_what_it_is_and_starts_nothing():
    proc = console("lbc-torchrun", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lbc-torchrun [torchrun options]")
    assert "lbc-train --help" in proc.stdout and "torchrun --help" in proc.stdout
    code = ("import sys\nfrom lbc.cli import torchrun\n"
            "torchrun.main(['--nproc_per_node=2', '--help', 'optim.lr=1'])\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([PYTHON, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lbc-torchrun") and proc.stdout.strip().endswith("False")

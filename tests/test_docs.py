"""The README and docs/ say what the code does.

A Python block marked ``<!-- runnable -->`` runs as written; any other Python block says in its first
line that it is a fragment (or a config file). A block marked ``<!-- file: PATH -->`` is
a verbatim part of that file of the repository (which its own tests run). A ``<!-- transcript -->`` block's ``$ command`` lines
print exactly the lines shown under them. Every ``lbc-train`` / ``lbc-torchrun`` command of a bash
block composes and passes the config checks. Links between the pages point at files that exist.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lbc.config import validate
from tests.helpers import PYTHON, ROOT, compose_config, run_cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(runnable|transcript|file:\s*\S+)\s*-->$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    marker: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the marker comment on the line before each (if any)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(path, i + 1, opening.group(1), marker.group(1) if marker else None,
                           "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL if b.marker == "runnable"]
TRANSCRIPTS = [b for b in ALL if b.marker == "transcript"]


def test_pages_have_blocks_of_each_kind():
    """The parser finds what the README shows: guards the other tests against passing on nothing."""
    readme = [b for b in ALL if b.path.name == "README.md"]
    assert any(b.marker == "runnable" and b.lang == "python" for b in readme)
    assert any(b.marker == "transcript" for b in readme)
    assert sum("lbc-train" in b.text for b in readme if b.lang == "bash") >= 3
    assert any((b.marker or "").startswith("file:") for b in readme)


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python" and b.marker is None], ids=str)
def test_python_blocks_are_runnable_or_say_what_they_are(block: Block):
    first = block.text.splitlines()[0]
    assert first.startswith("#") and ("fragment" in first or "config file" in first), (
        f"{block}: mark the block <!-- runnable --> (the suite runs it) or say in its first line that it is a fragment")


@pytest.mark.parametrize("block", [b for b in ALL if (b.marker or "").startswith("file:")], ids=str)
def test_file_blocks_are_the_files_text(block: Block):
    path = ROOT / block.marker.removeprefix("file:").strip()
    assert path.is_file(), f"{block}: {path} does not exist"
    assert block.text in path.read_text(), f"{block}: the block is not {path.relative_to(ROOT)} as it is now"


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_runnable_blocks_run(block: Block, tmp_path: Path):
    assert block.lang == "python", f"{block}: only Python blocks can be marked runnable"
    script = tmp_path / "block.py"
    script.write_text(block.text)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([PYTHON, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"


def transcript(block: Block) -> list[tuple[str, list[str]]]:
    """``[(command, expected output lines), ...]`` of a transcript block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block}: a transcript starts with a '$ ' command line"
            steps[-1][1].append(line)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("block", TRANSCRIPTS, ids=str)
def test_transcripts_print_what_they_show(block: Block):
    for command, expected in transcript(block):
        argv = shlex.split(command)
        assert argv[0] in {".venv/bin/lbc-train", "lbc-train"}, f"{block}: only lbc-train transcripts are checked"
        code, out, err = run_cli(*argv[1:])
        assert code == 2, (command, code, err)
        assert (out + err).splitlines() == expected, f"{block}: `{command}` printed:\n{out}{err}"


# Flags of lbc-train (Hydra's) that take a value, and the commands whose overrides are composed.
VALUE_FLAGS = {"--cfg", "-c", "--config-name", "-cn", "--config-path", "-cp", "--package", "-p", "--info", "-i"}
COMMANDS = re.compile(r"(?:^|\s)(?:\S*/)?(lbc-train|lbc-torchrun)(?=\s|$)(.*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, command line, overrides)`` of every lbc-train / lbc-torchrun command in a bash block."""
    found = []
    for block in ALL:
        if block.lang != "bash":
            continue
        for offset, raw in enumerate(block.text.splitlines()):
            code = raw.strip().split(" #")[0].split("&&")[-1]  # the last command of a chain, without its comment
            match = None if raw.strip().startswith("#") else COMMANDS.search(code)
            if not match:
                continue
            args = shlex.split(match.group(2))
            if any(a in {"--config-dir", "-cd", "--help", "-h"} for a in args):
                continue  # the user's own config directory; help runs nothing
            overrides, skip, multirun = [], False, "-m" in args or "--multirun" in args
            for arg in args:
                if skip:
                    skip = False
                elif arg in VALUE_FLAGS:
                    skip = True
                elif arg.startswith("-") or arg == "...":
                    continue  # Hydra's flags (-m), torchrun's options (--nproc_per_node=8)
                else:  # a sweep composes once per value: its first one stands for the rest
                    key, _, value = arg.partition("=")
                    overrides.append(f"{key}={value.split(',')[0]}" if multirun else arg)
            found.append((f"{block.path.relative_to(ROOT)}:{block.line + offset + 1}", raw.strip(), overrides))
    return found


COMMANDS_FOUND = documented_commands()


def test_documented_commands_are_found():
    assert len(COMMANDS_FOUND) >= 20 and any("task=lm" in c for _, c, _ in COMMANDS_FOUND)


@pytest.mark.parametrize(("where", "command", "overrides"), COMMANDS_FOUND, ids=[w for w, _, _ in COMMANDS_FOUND])
def test_documented_commands_compose(where: str, command: str, overrides: list[str]):
    """A command shown in the docs names keys, options and values that exist (it would start)."""
    cfg = compose_config([*overrides, "run_dir=docs-check"])
    validate(cfg)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files(page: Path):
    for target in LINK.findall(page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_readme_is_short_and_first_things_first():
    """Quick start, configuration and results come first; reference material lives in docs/."""
    text = (ROOT / "README.md").read_text()
    heads = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["Quick start", "Configuration", "Results"], heads
    assert len(text.splitlines()) < 330, "move reference material into docs/"


def test_console_scripts_named_in_docs_are_installed():
    """docs/install.md's table of console scripts is pyproject.toml's [project.scripts]."""
    import tomllib

    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    table = set(re.findall(r"^\| `(lbc-[a-z]+)` \|", (ROOT / "docs" / "install.md").read_text(), re.M))
    assert table == scripts


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""lbc.io's one atomic writer: never half a file, and the permissions a plain ``open()`` gives a new file
(``0o666 & ~umask``), for every file it writes (checkpoints, config.yaml, converted backbones)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from lbc.engine import checkpoint
from lbc.io import atomic_write


@pytest.fixture
def umask():
    """``umask(value)`` sets the process umask for the test; the old one is back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda value: os.umask(value)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def plain_open_mode(path: Path) -> int:
    """What ``open(path, "w")`` gives a new file under the current umask (the reference)."""
    with open(path, "w") as f:
        f.write("x")
    try:
        return mode(path)
    finally:
        path.unlink()


@pytest.mark.parametrize("value, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_a_plain_open_gives(tmp_path: Path, umask, value: int, expected: int) -> None:
    umask(value)
    assert plain_open_mode(tmp_path / "reference") == expected
    text = atomic_write(tmp_path / "config.yaml", lambda tmp: tmp.write_text("seed: 0\n"))
    checkpoint.save({"epoch": 1, "w": torch.zeros(2)}, tmp_path / "last.pt")  # how last.pt is written
    checkpoint.copy(tmp_path / "last.pt", tmp_path / "t_f.pt")  # a milestone copy
    for path in (text, tmp_path / "last.pt", tmp_path / "t_f.pt"):
        assert mode(path) == expected, (path.name, oct(mode(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.pt", "t_f.pt"]  # no temp file left


def test_a_write_that_replaces_the_temp_file_still_gets_the_umask_mode(tmp_path: Path, umask) -> None:
    """``write`` may move another file onto the temp path (the LM export does): its private mode is not kept."""
    umask(0o002)
    staged = tmp_path / "staged.bin"
    staged.write_bytes(b"weights")
    staged.chmod(0o600)
    out = atomic_write(tmp_path / "out" / "model.bin", lambda tmp: os.replace(staged, tmp))
    assert out.read_bytes() == b"weights" and mode(out) == 0o664


def test_an_existing_file_is_replaced_whole_or_not_at_all(tmp_path: Path, umask) -> None:
    umask(0o022)
    target = tmp_path / "last.pt"
    target.write_text("old")
    target.chmod(0o600)

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and mode(target) == 0o644  # a new file: the umask's mode, like open()


def test_the_temp_name_is_one_a_later_start_cleans_up(tmp_path: Path) -> None:
    seen: list[str] = []
    atomic_write(tmp_path / "last.pt", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")))
    (name,) = seen
    assert name.startswith(".last.pt.") and name.endswith(".tmp") and Path(name).parent == Path(".")
    (tmp_path / name).write_bytes(b"left by a killed save")
    assert checkpoint.clean_stale_temp(tmp_path) == [tmp_path / name]


def test_a_converted_backbone_follows_the_umask_too(tmp_path: Path, umask) -> None:
    from lbc.detection.backbone import save_backbone

    umask(0o002)
    payload = {"meta": {"depth": 18}, "tensors": {"conv1.weight": torch.ones(2, 2)}}
    for name in ("backbone.safetensors", "backbone.pt"):
        out = save_backbone(payload, tmp_path / name)
        assert mode(out) == 0o664, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "backbone.safetensors"]

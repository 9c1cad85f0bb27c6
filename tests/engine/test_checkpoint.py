"""Checkpoint files: atomic writes, and a one-line error for a missing or broken file."""

import pytest
import torch

from lbc.engine import checkpoint
from lbc.errors import ConfigError


def test_round_trip_and_no_temp_files_left(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3}
    checkpoint.save(state, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    loaded = checkpoint.load(tmp_path / "last.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_missing_or_broken_file_is_one_line(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="trainer.resume") as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint_is_one_line(tmp_path):
    checkpoint.save({"w": torch.randn(1000)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])  # a crash before atomic writes, say
    with pytest.raises(ConfigError, match="not a readable checkpoint") as err:
        checkpoint.load(tmp_path / "cut.pt")
    assert "\n" not in str(err.value)

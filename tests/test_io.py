"""lbc.io's one atomic writer: never half a file, and the permissions a plain ``open()`` gives a new file
(``0o666 & ~umask``), for every file it writes (checkpoints, config.yaml, converted backbones); a full disk
is one line and the previous file intact; and ``read_pt``'s refusal of pickled code."""

from __future__ import annotations

import errno
import os
import pickle
import stat
import warnings
from pathlib import Path

import pytest
import torch

from lbc.engine import checkpoint
from lbc.errors import ConfigError, DataError, WriteError
from lbc.io import _unpickler_line, atomic_write, load_model_weights, read_pt, storage_error


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


# --- a full disk, a quota, a read-only file system: one line, the previous file intact (issue 20) ---------------


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device (ENOSPC)"),
                                          (errno.EDQUOT, "disk quota exceeded (EDQUOT)"),
                                          (errno.EROFS, "read-only file system (EROFS)"),
                                          (errno.EACCES, "permission denied (EACCES)")])
def test_a_storage_failure_is_one_line_and_keeps_the_previous_file(tmp_path: Path, code: int, reason: str) -> None:
    target = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1, "w": torch.arange(1000.0)}, target)
    old = target.read_bytes()

    def half_then_full(tmp: Path) -> None:  # what a real torch.save does when the disk fills: half, then an error
        with open(tmp, "wb") as f:
            f.write(old[: len(old) // 2])
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError) as caught:
        atomic_write(target, half_then_full)
    assert str(caught.value) == (f"cannot write {target}: {reason}; the previous file is unchanged (free space or fix "
                                 "the permissions, then run the same command again)")
    assert caught.value.errno == code and isinstance(caught.value, DataError)  # what lbc-train prints as one line
    assert "\n" not in str(caught.value)
    assert target.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_storage_failure_of_a_new_file_says_nothing_was_written(tmp_path: Path) -> None:
    def full(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"^cannot write .*new\.pt: no space left on the device \(ENOSPC\); nothing "
                                         r"was written"):
        atomic_write(tmp_path / "new.pt", full)
    assert list(tmp_path.iterdir()) == []


def test_torch_saves_zip_writer_failure_is_a_write_error_too(tmp_path: Path) -> None:
    """torch.save on a full disk raises its zip writer's RuntimeError, not an OSError."""
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def zip_full(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    with pytest.raises(WriteError, match="the write failed .*is the disk full"):
        atomic_write(target, zip_full)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_parent_that_is_a_file_is_a_write_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match="a parent of it is a file"):
        atomic_write(tmp_path / "file" / "out.pt", lambda tmp: tmp.write_bytes(b"x"))


def test_other_errors_of_the_writer_are_not_disguised(tmp_path: Path) -> None:
    def bug(tmp: Path) -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "x.pt", bug)
    assert list(tmp_path.iterdir()) == []


# --- refusing pickled code: the blocked global named, never weights_only=False suggested ---------------------


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _payloads(tmp_path: Path) -> dict[str, Path]:
    out = {}
    torch.save({"model": _Shell()}, out.setdefault("zip", tmp_path / "zip.pt"))
    torch.save({"model": _Shell()}, out.setdefault("legacy", tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
    for protocol in (2, 4, 5):
        path = out.setdefault(f"bare{protocol}", tmp_path / f"bare{protocol}.pkl")
        path.write_bytes(pickle.dumps(_Shell(), protocol=protocol))
    return out


@pytest.mark.parametrize("kind", ["zip", "legacy", "bare2", "bare4", "bare5"])
def test_pickled_code_is_refused_naming_the_blocked_global(tmp_path: Path, kind: str, capfd) -> None:
    path = _payloads(tmp_path)[kind]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError) as caught:
            read_pt(path, "trainer.resume")
    message = str(caught.value)
    assert message.startswith(f"trainer.resume={str(path)!r} is not a checkpoint lbc can load safely: it needs "
                              f"{os.system.__module__}.system (pickled code"), message
    assert "weights_only" not in message and "\n" not in message
    assert seen == []  # torch's pickle-protocol UserWarnings stay inside the read
    assert "pwned" not in capfd.readouterr().out  # nothing of it ran


def test_load_model_weights_refuses_pickled_code_the_same_way(tmp_path: Path) -> None:
    path = _payloads(tmp_path)["zip"]
    with pytest.raises(ConfigError, match=rf"trainer.init_from=.* it needs {os.system.__module__}\.system") as caught:
        load_model_weights(torch.nn.Linear(2, 2), path, "trainer.init_from")
    assert "weights_only" not in str(caught.value)


def test_text_read_as_a_pickle_names_no_made_up_global(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("import os, pickle\nclass Evil:\n    pass\n")  # 'i' is pickle's INST opcode
    with pytest.raises(ConfigError) as caught:
        read_pt(path, "k")
    assert "is not a readable checkpoint" in str(caught.value) and "mport" not in str(caught.value)
    assert "weights_only" not in str(caught.value)


def test_the_unpicklers_complaint_is_kept_and_torchs_advice_dropped() -> None:
    err = pickle.UnpicklingError(
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
        "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted "
        "source.\nPlease file an issue with the following so that we can make `weights_only=True` compatible with "
        "your use case: WeightsUnpickler error: \n\nUnsupported operand 105\n\nCheck the documentation of torch.load")
    assert _unpickler_line(err) == "Unsupported operand 105"
    assert _unpickler_line(pickle.UnpicklingError("Weights only load failed. weights_only=False ...")) == \
        "torch's weights-only unpickler refused it"


def test_storage_error_names_the_path_for_a_library_save(tmp_path: Path) -> None:
    """What the lm export gives when save_pretrained (not atomic_write) hits a full disk."""
    err = storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "staging")
    assert isinstance(err, WriteError) and err.errno == errno.ENOSPC
    assert str(err).startswith(f"cannot write {tmp_path / 'staging'}: no space left on the device (ENOSPC)")
    assert storage_error(OSError(errno.ENOENT, "No such file"), tmp_path) is None  # not the storage's: re-raised
    assert storage_error(ValueError("bug"), tmp_path) is None

"""Issue 9, reliability and security of checkpoints: weights-only loading (a pickled payload never
runs), numpy's RNG state stored as tensors and numbers, stale temp files of killed saves."""

from __future__ import annotations

import builtins
import pickle
import random
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from lbc.engine import checkpoint
from lbc.errors import ConfigError
from lbc.io import load_model_weights, read_pt
from tests.helpers import PYTHON, ROOT, TINY, compose_config

# --- a pickle that runs code when it is loaded ---------------------------------------------------


class Payload:
    """Unpickling this calls ``exec``: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


def write_payload(path, marker, how):
    state = {"model": {"weight": Payload(marker)}, "epoch": 1}
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle named .pt
        path.write_bytes(pickle.dumps(state))
    return path


def test_the_payload_is_real(tmp_path):
    """Control: loaded without weights_only (as read_pt did before), the file runs its code."""
    marker = tmp_path / "ran"
    write_payload(tmp_path / "evil.pt", marker, "zip")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle's protocol 5
@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("key", ["trainer.resume", "trainer.init_from"])
def test_payload_is_refused_in_one_line_and_never_runs(tmp_path, key, how):
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / "evil.pt", marker, how)
    with pytest.raises(ConfigError) as err:
        if key == "trainer.resume":
            checkpoint.load(path, key)
        else:
            load_model_weights(nn.Linear(2, 2), path, key)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{key}={str(path)!r} is not a checkpoint lbc can load safely: it needs ")
    assert "exec" in msg and "(pickled code); lbc loads weights only" in msg
    assert not marker.exists()


def test_read_pt_refuses_numpy_arrays_too(tmp_path):
    """Only what torch allows weights-only (our allow-list is empty): an ndarray needs numpy's globals."""
    torch.save({"a": np.arange(3)}, tmp_path / "np.pt")
    with pytest.raises(ConfigError, match=r"needs numpy\..*pickled code"):
        read_pt(tmp_path / "np.pt", "trainer.resume")


# --- RNG states: weights-only and bit-exact --------------------------------------------------------


def test_rng_state_round_trips_weights_only_bit_exact(tmp_path):
    np.random.seed(123)
    np.random.standard_normal(3)  # odd count of normals: numpy caches one (has_gauss=1)
    random.seed(5)
    torch.manual_seed(7)
    state = checkpoint.rng_state()
    before = np.random.get_state()
    assert before[3] == 1
    checkpoint.save({"rng": [state]}, tmp_path / "last.pt")
    expect = (np.random.standard_normal(5), np.random.randint(0, 2**31, 5), random.random(), torch.rand(3))

    np.random.seed(0)  # scramble every generator
    random.seed(0)
    torch.manual_seed(0)
    loaded = torch.load(tmp_path / "last.pt", weights_only=True)["rng"][0]
    checkpoint.set_rng_state(loaded)
    after = np.random.get_state()
    assert after[0] == before[0] and np.array_equal(after[1], before[1]) and after[2:] == before[2:]
    got = (np.random.standard_normal(5), np.random.randint(0, 2**31, 5), random.random(), torch.rand(3))
    assert np.array_equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
    assert got[2] == expect[2] and torch.equal(got[3], expect[3])


# --- stale temp files of killed saves --------------------------------------------------------------

KILLED_SAVE = """
import os, signal, sys, torch
from lbc.engine import checkpoint
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # SIGKILL after the temp file is written
checkpoint.save({"w": torch.zeros(10)}, sys.argv[1])
"""


def test_clean_stale_temp_removes_what_a_killed_save_left(tmp_path):
    proc = subprocess.run([PYTHON, "-c", KILLED_SAVE, str(tmp_path / "last.pt")], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-500:]
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".last.pt.") and left[0].endswith(".tmp")  # the real leftover

    (tmp_path / ".dense.pt.tmp").write_bytes(b"half a copy")  # what copy() leaves
    others = [".notes.tmp", "last.pt.tmp", ".last.pt.tmp.keep", "keep.tmp", ".last.pt.a.b.tmp", "last.pt"]
    for name in others:
        (tmp_path / name).write_text("not ours")
    (tmp_path / ".sub.pt.tmp").mkdir()

    removed = checkpoint.clean_stale_temp(tmp_path)
    assert sorted(p.name for p in removed) == sorted([left[0], ".dense.pt.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, ".sub.pt.tmp"])
    assert checkpoint.clean_stale_temp(tmp_path) == []
    assert checkpoint.clean_stale_temp(tmp_path / "not_yet") == []


# --- a real trainer checkpoint (lbc 1:4, EMA on) ---------------------------------------------------


@pytest.fixture(scope="module")
def run_1to4(tmp_path_factory):
    from lbc.engine import trainer

    run_dir = tmp_path_factory.mktemp("lbc_1to4")
    trainer.run(compose_config([*TINY, f"run_dir={run_dir}", "sparsity.pattern=1:4", "trainer.ema=true"]))
    return run_dir / "last.pt"


@pytest.mark.slow
def test_real_checkpoint_loads_weights_only_with_nothing_allowed(run_1to4):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(run_1to4) == []
    ckpt = torch.load(run_1to4, weights_only=True)  # torch's defaults, no safe_globals of ours
    assert {"model", "optimizer", "scheduler", "sparsity", "epoch", "rng", "config", "scaler", "ema"} <= set(ckpt)
    assert ckpt["sparsity"]["pattern"] == "1:4" and ckpt["ema"] is not None
    assert ckpt["config"]["sparsity"]["pattern"] == "1:4"
    assert isinstance(ckpt["rng"][0]["numpy"]["keys"], torch.Tensor)

    np.random.seed(99)
    random.seed(99)
    torch.manual_seed(99)
    checkpoint.set_rng_state(ckpt["rng"][0])
    again = checkpoint.rng_state()
    saved = ckpt["rng"][0]
    assert torch.equal(again["torch"], saved["torch"]) and again["python"] == tuple(saved["python"])
    assert torch.equal(again["numpy"]["keys"], saved["numpy"]["keys"])
    assert {k: v for k, v in again["numpy"].items() if k != "keys"} == {
        k: v for k, v in saved["numpy"].items() if k != "keys"}

"""Issue 9, reliability and security of checkpoints: weights-only loading (a pickled payload never
runs), numpy's RNG state stored as tensors and numbers, stale temp files of killed saves, and the
checks that run before a checkpoint is loaded (ours? this model, method, pattern, optimizer? a config
this run can continue?)."""

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


# --- is it ours, and does it fit? (hand-made) ------------------------------------------------------


def ours(**over):
    net = nn.Linear(4, 2)
    ckpt = {
        "model": net.state_dict(), "optimizer": torch.optim.SGD(net.parameters(), lr=0.1).state_dict(),
        "scheduler": {}, "sparsity": {"method": "lbc", "pattern": "2:4", "epoch": 1.0}, "epoch": 1,
        "rng": [checkpoint.rng_state()], "config": {},
    }  # fmt: skip
    return ckpt | over


SP = {"method": "lbc", "pattern": "2:4", "epoch": 0.0}


@pytest.mark.parametrize(
    "ckpt, words",
    [
        ({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, "no 'sparsity' entry"),  # a plain state dict
        ({"model": {"weight": torch.zeros(2, 4)}}, "no 'sparsity' entry"),  # a dict without our keys
        ({k: v for k, v in ours().items() if k != "rng"}, "no 'rng' entry"),
        ([torch.zeros(2)], "it holds a list"),
    ],
)
def test_foreign_checkpoint_is_one_line(ckpt, words):
    with pytest.raises(ConfigError) as err:
        checkpoint.check_compatible(ckpt, SP, "trainer.resume", "x.pt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("trainer.resume='x.pt' is not an lbc training checkpoint")
    assert words in msg and msg.endswith("to start from model weights use trainer.init_from")


def test_foreign_pt_file_through_load_then_check(tmp_path):
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "weights.pt")
    ckpt = checkpoint.load(tmp_path / "weights.pt")  # weights-only readable
    with pytest.raises(ConfigError, match=r"is not an lbc training checkpoint \(no 'sparsity' entry\)"):
        checkpoint.check_compatible(ckpt, SP, "trainer.resume", tmp_path / "weights.pt")


@pytest.mark.parametrize("method, pattern", [("lbc", "1:4"), ("srste", "2:4")])
def test_other_sparsity_is_one_line_naming_both(method, pattern):
    ckpt = ours(sparsity={"method": method, "pattern": pattern, "epoch": 1.0})
    with pytest.raises(ConfigError) as err:
        checkpoint.check_compatible(ckpt, SP, "trainer.resume", "x.pt", model_state={"other": torch.zeros(1)})
    assert "\n" not in str(err.value)
    assert f"sparsity state is for {method} {pattern}, not lbc 2:4" in str(err.value)  # before the model


def test_model_mismatch_is_one_line_with_counts():
    mine = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).state_dict()
    with pytest.raises(ConfigError) as err:
        checkpoint.check_compatible(ours(), SP, "trainer.resume", "x.pt", model_state=mine)
    msg = str(err.value)
    assert "\n" not in msg and "does not fit the model" in msg
    assert "4 missing key(s) (first '0.weight')" in msg and "2 unexpected key(s) (first 'weight')" in msg

    wide = nn.Linear(4, 5).state_dict()
    with pytest.raises(ConfigError, match=r"2 shape\(s\) differ \(first 'weight': \[2, 4\] in the checkpoint, "
                                          r"\[5, 4\] in the model\)"):
        checkpoint.check_compatible(ours(), SP, "trainer.resume", "x.pt", model_state=wide)
    checkpoint.check_compatible(ours(), SP, "trainer.resume", "x.pt", model_state=nn.Linear(4, 2).state_dict())


def test_optimizer_mismatch_is_one_line():
    net = nn.Linear(4, 2)
    adamw = torch.optim.AdamW(net.parameters()).state_dict()
    with pytest.raises(ConfigError, match="optimizer state is for another optimizer") as err:
        checkpoint.check_compatible(ours(), SP, optimizer_state=adamw)
    assert "\n" not in str(err.value)
    two = torch.optim.SGD([{"params": [net.weight]}, {"params": [net.bias]}], lr=0.1).state_dict()
    with pytest.raises(ConfigError, match=r"parameter groups of \[2\] parameters, this run has \[1, 1\]"):
        checkpoint.check_compatible(ours(), SP, optimizer_state=two)
    checkpoint.check_compatible(ours(), SP, optimizer_state=torch.optim.SGD(net.parameters(), lr=0.5).state_dict())


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
    assert set(checkpoint.REQUIRED) | {"scaler", "ema", "metrics"} <= set(ckpt)
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


@pytest.mark.slow
def test_real_1to4_checkpoint_into_a_2to4_run_is_the_friendly_line(run_1to4, tmp_path):
    from lbc.engine import trainer

    t = trainer.build(compose_config([*TINY, f"run_dir={tmp_path / 'new'}"]))
    ckpt = checkpoint.load(run_1to4)
    with pytest.raises(ConfigError) as err:
        checkpoint.check_compatible(ckpt, t.sparsity.state_dict(), "trainer.resume", run_1to4,
                                    model_state=t.model.state_dict(), optimizer_state=t.optimizer.state_dict())
    assert str(err.value) == (
        f"trainer.resume={str(run_1to4)!r}: sparsity state is for lbc 1:4, not lbc 2:4: resume with the same "
        "sparsity config, or start a new run_dir")


@pytest.mark.slow
def test_real_checkpoint_of_another_model_is_one_line(run_1to4, tmp_path):
    from lbc.engine import trainer

    t = trainer.build(compose_config([*TINY, f"run_dir={tmp_path / 'new'}", "sparsity.pattern=1:4",
                                      "model.widths=[16,32,32]"]))
    ckpt = checkpoint.load(run_1to4)
    with pytest.raises(ConfigError, match=r"does not fit the model: \d+ shape\(s\) differ \(first 'layers.2"):
        checkpoint.check_compatible(ckpt, t.sparsity.state_dict(), "trainer.resume", run_1to4,
                                    model_state=t.model.state_dict())


# --- through the trainer (needs the calls in lbc/engine/trainer.py) --------------------------------


@pytest.mark.slow
def test_trainer_refuses_1to4_checkpoint_for_2to4_run(run_1to4, tmp_path):
    from lbc.engine import trainer

    with pytest.raises(ConfigError, match="sparsity state is for lbc 1:4, not lbc 2:4") as err:
        trainer.build(compose_config([*TINY, f"run_dir={tmp_path / 'new'}", f"trainer.resume={run_1to4}"]))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_trainer_refuses_a_changed_lr_and_takes_the_finished_same_config(run_1to4, tmp_path):
    from lbc.engine import trainer

    base = [*TINY, f"run_dir={tmp_path / 'new'}", f"trainer.resume={run_1to4}", "sparsity.pattern=1:4"]
    with pytest.raises(ConfigError, match=r"changed optim.lr \(0.1 -> 0.05\) cannot be honoured"):
        trainer.build(compose_config([*base, "trainer.ema=true", "optim.lr=0.05"]))
    t = trainer.build(compose_config([*base, "trainer.ema=true"]))  # same config, already finished: fine
    assert t.start_epoch == t.epochs == 2


@pytest.mark.slow
def test_trainer_cleans_stale_temp_at_start(tmp_path):
    from lbc.engine import trainer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".last.pt.k1ll3d00.tmp").write_bytes(b"half a checkpoint")
    trainer.build(compose_config([*TINY, f"run_dir={run_dir}", "sparsity=dense"]))
    assert not (run_dir / ".last.pt.k1ll3d00.tmp").exists()


@pytest.mark.parametrize("how", ["resume", "init_from", "planted"])
def test_payload_through_lbc_train_never_runs(tmp_path, how):
    """The three ways a checkpoint reaches a run: trainer.resume, trainer.init_from, a last.pt in run_dir."""
    from tests.helpers import run_cli

    marker, run_dir = tmp_path / "ran", tmp_path / "run"
    run_dir.mkdir()
    evil = write_payload((run_dir / "last.pt") if how == "planted" else (tmp_path / "evil.pt"), marker, "zip")
    extra = {"resume": [f"trainer.resume={evil}"], "init_from": [f"trainer.init_from={evil}"], "planted": []}[how]
    code, out, err = run_cli(*TINY, *extra, f"run_dir={run_dir}")
    assert code == 2 and err.count("\n") == 1 and "(pickled code); lbc loads weights only" in err, err
    assert not marker.exists() and "done:" not in out


@pytest.mark.parametrize("content", [b"hello world\n", bytes(range(256)) * 4, b""])
def test_text_or_random_bytes_are_one_line(tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        read_pt(path, "trainer.init_from")
    assert str(err.value).startswith(f"trainer.init_from='{path}' is not a readable checkpoint")
    assert "\n" not in str(err.value)

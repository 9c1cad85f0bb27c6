"""Every bad command-line value is exit status 2, exactly one line on stderr naming it, and no traceback.

One table, grouped by family (issue #9's probe: loader, sparsity, data, devices, checkpoints, run
directories, and the keys that are accepted but would mean something else).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY, run_cli

CASES: list[tuple[str, list[str], str]] = [
    # loader keys
    ("loader", ["data.loader.batch_size=0"], "data.loader.batch_size"),
    ("loader", ["data.loader.batch_size=-3"], "data.loader.batch_size"),
    ("loader", ["data.loader.batch_size=abc"], "data.loader.batch_size"),
    ("loader", ["data.loader.batch_size=5000"], "data.loader.batch_size=5000"),  # no training step
    ("loader", ["data.loader.workers=-1"], "data.loader.workers"),
    ("loader", ["data.loader.repeated_aug=-2"], "data.loader.repeated_aug"),
    ("loader", ["data.loader.shuffle=true"], "data.loader.shuffle"),
    # sparsity keys
    ("sparsity", ["sparsity.t_f=-1"], "sparsity.t_f"),
    ("sparsity", ["sparsity.t_f=soon"], "sparsity.t_f"),
    ("sparsity", ["sparsity.t_i=5", "sparsity.t_f=2"], "sparsity.t_f"),
    ("sparsity", ["sparsity.exponent=2.5"], "sparsity.exponent"),
    ("sparsity", ["sparsity.exponent=0"], "sparsity.exponent"),
    ("sparsity", ["sparsity.exclude=3"], "sparsity.exclude"),
    ("sparsity", ["sparsity.score_weight_decay=-1"], "sparsity.score_weight_decay"),
    ("sparsity", ["sparsity.score_init=abc"], "sparsity.score_init"),
    ("sparsity", ["sparsity.rounding=up"], "sparsity.rounding"),
    ("sparsity", ["sparsity.update_every=never"], "sparsity.update_every"),
    ("sparsity", ["sparsity.criterion=luck"], "sparsity.criterion"),
    ("sparsity", ["sparsity.strict=maybe"], "sparsity.strict"),
    ("sparsity", ["sparsity.pattern=2:3"], "sparsity.pattern=2:3"),  # no layer can take it
    ("sparsity", ["sparsity.pattern=4:4"], "sparsity.pattern"),
    ("sparsity", ["sparsity.pattern=half"], "sparsity.pattern"),
    ("sparsity", ["sparsity.method=nope"], "sparsity.method"),
    ("sparsity", ["+sparsity.common=1"], "sparsity.common"),
    ("sparsity", ["sparsity.comon=1"], "sparsity.comon"),
    ("sparsity", ["sparsity=srste", "sparsity.lambda_w=-1"], "sparsity.lambda_w"),
    ("sparsity", ["sparsity=asp", "sparsity.dense_epochs=2.5"], "sparsity.dense_epochs"),
    ("sparsity", ["sparsity=asp", "sparsity.dense_epochs=1", "sparsity.finetune_epochs=30"], "schedule.epochs"),
    # data keys
    ("data", ["data.image_size=0"], "data.image_size"),
    ("data", ["data.num_classes=5"], "data.num_classes"),
    ("data", ["data.input_size=[3,8]"], "data.input_size"),
    ("data", ["data.augment.label_smoothing=1.5"], "data.augment.label_smoothing"),
    ("data", ["data.augment.mixup=-1"], "data.augment.mixup"),
    ("data", ["data=imagenet"], "data.root"),
    ("data", ["data=imagenet", "data.root=/nonexistent"], "/nonexistent"),
    ("data", ["data=synthetic", "data.train_size=0"], "data.train_size"),
    # devices and the trainer
    ("device", ["trainer.device=cuda"], "trainer.device=cuda"),
    ("device", ["trainer.device=cuda:3"], "trainer.device=cuda:3"),
    ("device", ["trainer.device=tpu"], "trainer.device"),
    ("trainer", ["trainer.amp=fp8"], "trainer.amp"),
    ("trainer", ["trainer.compile=maybe"], "trainer.compile"),
    ("trainer", ["trainer.ema_decay=1.5"], "trainer.ema_decay"),
    ("trainer", ["trainer.log_interval=0"], "trainer.log_interval"),
    # optimizer and schedule: values accepted before that meant something else
    ("optim", ["optim.lr=-1"], "optim.lr"),
    ("optim", ["optim.momentum=1"], "optim.momentum"),
    ("optim", ["optim.name=lamb"], "optim.name"),
    ("schedule", ["schedule.epochs=0"], "schedule.epochs"),
    ("schedule", ["schedule.min_lr=1"], "schedule.min_lr"),
    ("schedule", ["schedule.warmup_epochs=20"], "schedule.warmup_epochs"),
    ("top", ["seed=abc"], "seed"),
    # models
    ("model", ["model.name=nope"], "model.name"),
    ("model", ["model=nope"], "model=nope"),
    ("model", ["model.source=hub"], "model.source"),
    ("model", ["+model.extra.foo=1"], "does not take the option 'foo'"),
    # checkpoints
    ("checkpoint", ["trainer.resume=/nonexistent.pt"], "trainer.resume"),
    ("checkpoint", ["trainer.init_from=/nonexistent.pt"], "trainer.init_from"),
]


@pytest.mark.parametrize("family, overrides, key", CASES, ids=[" ".join(c[1]) for c in CASES])
def test_bad_value_is_one_line_and_exit_2(tmp_path: Path, family, overrides, key):
    code, out, err = run_cli(*TINY, *overrides, f"run_dir={tmp_path / 'run'}")
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
    assert "Traceback" not in err + out
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path: Path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    for key in ("trainer.resume", "trainer.init_from"):
        code, _, err = run_cli(*TINY, f"{key}={junk}", f"run_dir={tmp_path / key}")
        assert code == 2 and err.count("\n") == 1 and key in err, err


def test_a_data_set_of_unreadable_images_stops_instead_of_reporting_zero(tmp_path: Path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                (tmp_path / "data" / split / cls / f"{i}.png").write_bytes(b"\x89PNG broken")
    code, out, err = run_cli(*TINY, "data=imagenet", f"data.root={tmp_path / 'data'}", "data.num_classes=2",
                             "data.image_size=16", "data.loader.batch_size=2", f"run_dir={tmp_path / 'run'}")
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and "no readable training image (8 unreadable)" in err
    assert "top-1 0.00" not in out and not (tmp_path / "run" / "last.pt").exists()

"""The one resume check (lbc/run/resume.py) and the rules declared beside the schema fields
(lbc/config/resume.py): ignored, honoured and refused changes, keys added to a schema after a run was
saved, and a real classification checkpoint whose saved config predates every defaulted key."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from omegaconf import OmegaConf

from lbc.config.resume import (
    ALLOW,
    IGNORE,
    NO_DEFAULT,
    REFUSE,
    flatten_keys,
    on_resume,
    rule_of,
    schema_default,
)
from lbc.errors import ConfigError
from lbc.run.resume import changed_keys, check_epoch, check_resume
from tests.helpers import TINY, compose_config


@pytest.fixture(scope="module")
def cfg():
    return compose_config([*TINY, "run_dir=outputs/a"])


def saved_of(cfg, **dotted):
    """The plain saved config of ``cfg``, with ``a__b=value`` changes (a value of ... deletes the key)."""
    saved = OmegaConf.to_container(cfg, resolve=True)
    for name, value in dotted.items():
        *parents, leaf = name.split("__")
        node = saved
        for p in parents:
            node = node[p]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return saved


def test_rules_come_from_the_fields_and_are_inherited(cfg):
    assert rule_of(cfg, "run_dir") == IGNORE and rule_of(cfg, "task.runner") == IGNORE
    assert rule_of(cfg, "trainer.progress") == IGNORE and rule_of(cfg, "trainer.device") == IGNORE
    assert rule_of(cfg, "data.loader.workers") == IGNORE  # nested: the loader's own field
    assert rule_of(cfg, "trainer.ema") == ALLOW and rule_of(cfg, "trainer.clip_grad") == ALLOW  # trainer's rule
    for key in ("optim.lr", "schedule.epochs", "sparsity.t_f", "model.widths", "data.loader.batch_size", "seed",
                "trainer.max_steps_per_epoch", "trainer.auto_scale_lr"):
        assert rule_of(cfg, key) == REFUSE, key
    assert rule_of(cfg, "trainer.not_a_field") == ALLOW  # unknown to the schema: its parent's rule
    assert rule_of(cfg, "nothing.at_all") == REFUSE  # unknown at the top: refused


def test_detection_rules_are_the_detection_schemas(tmp_path):
    det = compose_config(["task=detection", f"data.root={tmp_path}", f"run_dir={tmp_path}/run"])
    for key in ("data.num_workers", "data.val_batch_size", "trainer.val_interval", "trainer.checkpoint_interval",
                "trainer.max_keep_checkpoints"):
        assert rule_of(det, key) == ALLOW, key
    for key in ("data.root", "trainer.progress", "trainer.log_interval", "trainer.device"):
        assert rule_of(det, key) == IGNORE, key
    for key in ("data.batch_size", "data.image_scale", "model.depth", "schedule.milestones", "trainer.auto_scale_lr"):
        assert rule_of(det, key) == REFUSE, key


def test_schema_default_is_the_fields_default(cfg):
    assert schema_default(cfg, "sparsity.removal") == "paper"
    assert schema_default(cfg, "data.loader.global_batch_size") is None
    assert schema_default(cfg, "model.widths") == [16, 32, 64]  # a default_factory
    assert schema_default(cfg, "run_dir") is NO_DEFAULT  # required (MISSING)
    assert schema_default(cfg, "trainer.not_a_field") is NO_DEFAULT


def test_changed_keys_skip_ignored_and_list_the_rest_in_order(cfg):
    assert changed_keys(saved_of(cfg), cfg) == []
    bookkeeping = saved_of(cfg, run_dir="elsewhere", trainer__resume="x.pt", trainer__progress=False,
                           trainer__log_interval=1, trainer__ckpt_interval=5, trainer__device="cuda",
                           data__loader__workers=8, task={"name": "other", "runner": "a.b"})
    assert changed_keys(bookkeeping, cfg) == []
    changed = saved_of(cfg, optim__lr=0.05, trainer__ema=True, seed=1)
    changed["trainer"]["old_key"] = 1  # a key today's schema dropped: only the saved config has it
    keys = changed_keys(changed, cfg)
    assert set(keys) == {"optim.lr", "trainer.ema", "seed", "trainer.old_key"} and keys[-1] == "trainer.old_key"


def test_a_key_missing_from_the_saved_config_takes_its_schema_default(cfg):
    old = saved_of(cfg, sparsity__removal=..., data__loader__global_batch_size=..., trainer__auto_scale_lr=...)
    assert changed_keys(old, cfg) == []
    released = compose_config([*TINY, "run_dir=outputs/a", "sparsity.removal=released"])
    assert changed_keys(old, released) == ["sparsity.removal"]  # today's value is not the old behaviour
    with pytest.raises(ConfigError, match=r"changed sparsity.removal \('paper' -> 'released'\) cannot be honoured"):
        check_resume(old, released, key="run_dir", path="r/last.pt")


def test_every_defaulted_key_can_be_missing_from_the_saved_config(cfg):
    """A saved config from a schema lacking any of today's fields that run at their default resumes:
    no list of added keys is kept anywhere."""
    saved = saved_of(cfg)
    flat = flatten_keys(saved)
    defaulted = [k for k in flat if schema_default(cfg, k) is not NO_DEFAULT and schema_default(cfg, k) == flat[k]]
    assert len(defaulted) > 25 and "sparsity.removal" in defaulted
    old = copy.deepcopy(saved)
    for k in defaulted:
        *parents, leaf = k.split(".")
        node = old
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    assert changed_keys(old, cfg) == []


@pytest.mark.parametrize("override", ["schedule.epochs=3", "schedule.warmup_epochs=1", "optim.lr=0.5", "optim=adamw",
                                      "sparsity.pattern=1:4", "sparsity.t_f=2", "model.widths=[8,16,32]",
                                      "data.loader.batch_size=8", "seed=2", "trainer.max_steps_per_epoch=2"])
def test_refused_changes_are_one_line(cfg, override):
    current = compose_config([*TINY, "run_dir=outputs/a", override])
    with pytest.raises(ConfigError) as err:
        check_resume(saved_of(cfg), current, key="trainer.resume", path="r/last.pt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("trainer.resume='r/last.pt' was written with another config: changed ")
    assert f"{override.split('=')[0]}" in msg and msg.endswith("start a new run_dir or put the old values back")


def test_honoured_changes_are_returned(cfg):
    current = compose_config([*TINY, "run_dir=outputs/b", "trainer.ema=true", "trainer.clip_grad=1.0",
                              "data.loader.workers=2"])
    assert check_resume(saved_of(cfg), current, epoch=1) == ["trainer.ema", "trainer.clip_grad"]


def test_the_message_names_old_and_new_values(cfg):
    current = compose_config([*TINY, "run_dir=outputs/a", "optim.lr=0.05", "schedule.epochs=8", "seed=3",
                              "sparsity.pattern=1:4"])
    with pytest.raises(ConfigError) as err:
        check_resume(saved_of(cfg), current, key="trainer.resume", path="r/last.pt")
    msg = str(err.value)
    assert "sparsity.pattern ('2:4' -> '1:4')" in msg and "optim.lr (0.1 -> 0.05)" in msg and "and 2 more" in msg  # sparsity.t_f follows the epochs


def test_check_epoch_finished_only_with_the_same_config(cfg):
    assert check_epoch(2, 4, ["trainer.ema"]) is False
    assert check_epoch(4, 4, []) is True  # already finished: nothing to do
    with pytest.raises(ConfigError, match=r"already finished all 4 epochs; the changed trainer.ema would not be used"):
        check_epoch(4, 4, ["trainer.ema"])
    with pytest.raises(ConfigError, match="is at epoch 5, past schedule.epochs=4"):
        check_epoch(5, 4, [])
    ema = compose_config([*TINY, "run_dir=outputs/a", "trainer.ema=true"])
    with pytest.raises(ConfigError, match="already finished"):
        check_resume(saved_of(cfg), ema, epoch=2)  # TINY trains 2 epochs


def test_on_resume_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="choose from"):
        on_resume("maybe", default=0)
    assert dataclasses.fields(dataclasses.make_dataclass("X", [("a", int, on_resume(IGNORE, default=1))]))[0].metadata[
        "resume"] == IGNORE


@pytest.mark.slow
def test_a_checkpoint_from_a_schema_without_a_new_key_resumes(tmp_path, monkeypatch):
    """End to end: a real run's last.pt, its saved config stripped of a key (as if written before the key
    existed), resumes; then a schema that gained a new field (with a default) still resumes the original."""
    import torch

    from lbc.config.classification import TrainerConfig
    from lbc.engine import trainer

    run = tmp_path / "run"
    overrides = [*TINY, "schedule.epochs=2", f"run_dir={run}"]
    t = trainer.build(compose_config([*overrides, "schedule.epochs=1"]))
    trainer.fit(t)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    del ckpt["config"]["sparsity"]["removal"], ckpt["config"]["data"]["loader"]["global_batch_size"]
    torch.save(ckpt, run / "last.pt")
    with pytest.raises(ConfigError, match=r"changed .*schedule.epochs \(1 -> 2\)"):  # control: still refused
        trainer.build(compose_config(overrides)).release()

    # a field added to the trainer schema after the checkpoint was written (default: the old behaviour)
    newer = dataclasses.make_dataclass("TrainerConfig", [("brand_new_key", int, dataclasses.field(default=7))],
                                       bases=(TrainerConfig,))
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="trainer", name="base_default", node=newer)
    try:
        cfg = compose_config([*overrides, "schedule.epochs=1"])
        assert cfg.trainer.brand_new_key == 7 and "brand_new_key" not in ckpt["config"]["trainer"]
        t = trainer.build(cfg)
        t.release()
        assert t.start_epoch == 1 and t.resumed_from == str(run / "last.pt")
    finally:
        ConfigStore.instance().store(group="trainer", name="base_default", node=TrainerConfig)

"""Every config group option and every experiment composes, validates and builds; bad values fail in one line."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import lbc
from lbc.config import div, mul, validate
from lbc.engine.optim import build_optimizer, build_scheduler, weight_decay_groups
from lbc.errors import ConfigError
from lbc.models import build_model
from tests.helpers import CONFIGS, compose_config

GROUPS = ("model", "data", "sparsity", "optim", "schedule", "trainer")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_train_yaml_has_every_group_and_nothing_of_substance():
    raw = OmegaConf.load(CONFIGS / "train.yaml")
    listed = {next(iter(d)) for d in raw.defaults if OmegaConf.is_dict(d)}
    assert set(GROUPS) | {"experiment"} <= listed
    assert set(raw) <= {"defaults", "seed", "run_dir", "hydra"}


def test_default_config_composes_and_validates():
    cfg = compose_config()
    validate(cfg)
    assert cfg.model.name == "resnet_small" and cfg.data.name == "digits"
    assert cfg.optim.name == "sgd" and cfg.schedule.name == "cosine"
    assert cfg.trainer.device == "auto" and cfg.trainer.resume is None
    assert str(cfg.run_dir).startswith("outputs/")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_overrides_reach_the_config():
    cfg = compose_config(["optim=adamw", "optim.lr=0.002", "schedule.epochs=7", "seed=3", "trainer.amp=bf16"])
    validate(cfg)
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.epochs, cfg.seed, cfg.trainer.amp) == ("adamw", 0.002, 7, 3, "bf16")


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("option", options("model"))
def test_every_model_config_builds(option):
    cfg = compose_config([f"model={option}"])
    validate(cfg)
    model = build_model(num_classes=10, **{k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()})
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("option", options("data"))
def test_every_data_config_validates(option):
    cfg = compose_config([f"data={option}"])
    if OmegaConf.missing_keys(cfg):  # e.g. data.root: the error names it
        with pytest.raises(ConfigError, match=sorted(OmegaConf.missing_keys(cfg))[0]):
            validate(cfg)
        return
    validate(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data["name"], str) and "loader" in data and "augment" in data


@pytest.mark.parametrize("option", options("sparsity"))
def test_every_sparsity_config_attaches(option):
    cfg = compose_config([f"sparsity={option}"])
    validate(cfg)
    model = build_model("resnet_small", num_classes=10)
    sp = lbc.sparsify(model, **OmegaConf.to_container(cfg.sparsity, resolve=True), input_size=(3, 32, 32))
    sp.update(0.0)
    assert isinstance(sp.report()["scalars"], dict)


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("schedule", options("schedule"))
def test_every_optimizer_and_schedule_builds(optim, schedule):
    cfg = compose_config([f"optim={optim}", f"schedule={schedule}"])
    validate(cfg)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    o = cfg.optim
    extra = {k: o[k] for k in ("momentum", "nesterov", "betas", "eps") if k in o}
    opt = build_optimizer(o.name, weight_decay_groups(model, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay, **extra)
    s = cfg.schedule
    sched = build_scheduler(opt, s.epochs, 10, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    sched.step_update(s.epochs * 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(s.min_lr)


@pytest.mark.parametrize("option", options("trainer"))
def test_every_trainer_config_validates(option):
    validate(compose_config([f"trainer={option}"]))


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(option):
    text = (CONFIGS / "experiment" / f"{option}.yaml").read_text()
    assert text.lstrip().startswith("# @package _global_")
    cfg = compose_config([f"experiment={option}"])
    fill = [f"{key}=/nonexistent" for key in OmegaConf.missing_keys(cfg)]  # e.g. data.root
    cfg = compose_config([f"experiment={option}", *fill])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    build_model(num_classes=cfg.data.get("num_classes") or 10, **OmegaConf.to_container(cfg.model, resolve=True))


def test_resolvers():
    assert div(10, 2) == 5 and isinstance(div(10, 2), int)
    assert div(3, 2) == 1.5 and mul(3, 0.5) == 1.5
    cfg = OmegaConf.create({"a": 300, "b": "${div:${a},2}", "c": "${mul:${a},2}"})
    assert (cfg.b, cfg.c) == (150, 600)
    with pytest.raises(ConfigError):
        div(1, 0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("schedule.epochs=0", "schedule.epochs"),
        ("schedule.epochs=2.5", "schedule.epochs"),
        ("schedule.warmup_epochs=40", "schedule.warmup_epochs"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("trainer.max_steps_per_epoch=0", "trainer.max_steps_per_epoch"),
        ("trainer.ema_decay=1.5", "trainer.ema_decay"),
        ("optim.name=lamb", "optim.name"),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_config([override]))
    assert key in str(e.value) and "\n" not in str(e.value)

"""The structured configs: every option composes on its schema, builds, and refuses bad keys and values in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import lbc
from lbc.config import (
    SCHEMAS,
    CausalLMConfig,
    CosineConfig,
    DetectorConfig,
    as_config_error,
    div,
    mul,
    sub,
    validate,
)
from lbc.engine.optim import build_optimizer, build_scheduler, weight_decay_groups
from lbc.errors import ConfigError
from lbc.models import build_model
from tests.helpers import CONFIGS, compose_config

GROUPS = ("model", "data", "sparsity", "optim", "schedule", "trainer", "task")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def classification_options(group: str) -> list[str]:
    """The group's options lbc's own trainer builds (task=detection's are tested in tests/detection, task=lm's
    in tests/lm)."""
    other_tasks = {"model": (DetectorConfig, CausalLMConfig)}
    return [o for o in options(group) if not (group in other_tasks and SCHEMAS[group].get(o) in other_tasks[group])]


def composition_error(overrides: list[str]) -> str:
    """What ``lbc-train`` prints for a config Hydra cannot compose (built from the exception Hydra raises)."""
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    return str(as_config_error(info.value))


def test_train_yaml_has_every_group_and_nothing_of_substance():
    raw = OmegaConf.load(CONFIGS / "train.yaml")
    listed = {next(iter(d)) for d in raw.defaults if OmegaConf.is_dict(d)}
    assert set(GROUPS) | {"experiment"} <= listed
    assert set(raw) <= {"defaults", "seed", "run_dir", "hydra"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_file_extends_its_schema(group):
    """Each ``<group>/<option>.yaml`` starts from ``base_<option>`` (or another option that does)."""
    for option in options(group):
        defaults = list(OmegaConf.load(CONFIGS / group / f"{option}.yaml").get("defaults", []))
        assert defaults and defaults[-1] == "_self_", f"{group}/{option}.yaml"
        parent = defaults[0].removesuffix(f"@{group}")  # a `# @package _global_` option (task) places its schema
        assert parent == f"base_{option}" or parent in options(group), f"{group}/{option}.yaml extends {parent}"
        if parent == f"base_{option}":
            assert option in SCHEMAS[group], f"no schema for {group}/{option}"


def test_default_config_composes_and_validates():
    cfg = compose_config()
    typed = validate(cfg)
    assert cfg.model.name == "resnet_small" and cfg.data.name == "digits"
    assert typed["optim"].name == "sgd" and typed["schedule"].name == "cosine"
    assert typed["trainer"].device == "auto" and typed["trainer"].resume is None
    assert typed["sparsity"].method == "lbc" and typed["sparsity"].t_f == cfg.schedule.epochs / 2
    assert str(cfg.run_dir).startswith("outputs/")
    for group in SCHEMAS:
        assert dataclasses.is_dataclass(typed[group]), group  # every shipped option has a schema


def test_overrides_reach_the_typed_config():
    typed = validate(compose_config(["optim=adamw", "optim.lr=0.002", "schedule.epochs=7", "seed=3", "trainer.amp=bf16"]))
    assert (typed["optim"].name, typed["optim"].lr, typed["schedule"].epochs, typed["trainer"].amp) == (
        "adamw", 0.002, 7, "bf16")


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert options(group), f"lbc/configs/{group}/ is empty"


@pytest.mark.parametrize("option", classification_options("model"))
def test_every_model_config_builds(option):
    typed = validate(compose_config([f"model={option}"]))
    model = build_model(num_classes=10, **dataclasses.asdict(typed["model"]))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("option", options("sparsity"))
def test_every_sparsity_config_attaches(option):
    typed = validate(compose_config([f"sparsity={option}"]))
    model = build_model("resnet_small", num_classes=10)
    sp = lbc.sparsify(model, **dataclasses.asdict(typed["sparsity"]), input_size=(3, 32, 32))
    sp.update(0.0)
    assert sp.name == option and set(sp.report()["scalars"]) >= {"density", "exact_nm", "train_flops_ratio"}


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("schedule", [s for s in options("schedule") if SCHEMAS["schedule"][s] is CosineConfig])
def test_every_optimizer_and_schedule_builds(optim, schedule):
    typed = validate(compose_config([f"optim={optim}", f"schedule={schedule}"]))
    o, s = typed["optim"], typed["schedule"]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    extra = {k: v for k, v in dataclasses.asdict(o).items() if k in ("momentum", "nesterov", "betas", "eps")}
    opt = build_optimizer(o.name, weight_decay_groups(model, o.weight_decay), lr=o.lr, weight_decay=o.weight_decay, **extra)
    sched = build_scheduler(opt, s.epochs, 10, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    sched.step_update(s.epochs * 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(s.min_lr)


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(option):
    text = (CONFIGS / "experiment" / f"{option}.yaml").read_text()
    assert text.lstrip().startswith("# @package _global_")
    cfg = compose_config([f"experiment={option}"])
    fill = [f"{key}=/nonexistent" for key in OmegaConf.missing_keys(cfg)]  # e.g. data.root
    typed = validate(compose_config([f"experiment={option}", *fill]))
    build_model(num_classes=typed["data"].num_classes or 10, **dataclasses.asdict(typed["model"]))


def test_resolvers():
    assert div(10, 2) == 5 and isinstance(div(10, 2), int)
    assert div(3, 2) == 1.5 and mul(3, 0.5) == 1.5 and sub(5, 2) == 3
    cfg = OmegaConf.create({"a": 300, "b": "${div:${a},2}", "c": "${mul:${a},2}", "d": "${sub:${a},100}"})
    assert (cfg.b, cfg.c, cfg.d) == (150, 600, 200)
    with pytest.raises(ConfigError):
        div(1, 0)


def _cases() -> list[tuple[str, str, str | None, str | None]]:
    """(group, option, a typed key of its schema, a value of the wrong type for it) per shipped option.

    Schemas whose keys are all strings (a torchvision model by name) get (None, None): only the
    unknown-key half of the test applies to them.
    """
    wrong = {int: "abc", float: "abc", bool: "maybe"}
    cases = []
    for group, schemas in SCHEMAS.items():
        for option, schema in schemas.items():
            if option not in options(group):
                continue
            typed_field = next((f for f in dataclasses.fields(schema) if f.type in ("int", "float", "bool")), None)
            if typed_field is None:
                cases.append((group, option, None, None))
                continue
            cases.append((group, option, typed_field.name, wrong[{"int": int, "float": float, "bool": bool}[typed_field.type]]))
    return cases


@pytest.mark.parametrize("group, option, key, bad", _cases())
def test_every_schema_refuses_a_wrong_type_and_an_unknown_key_in_one_line(group, option, key, bad):
    base = [f"{group}={option}"] + (["data.root=/nonexistent"] if option in ("imagenet", "coco") else [])
    if key is not None:
        line = composition_error([*base, f"{group}.{key}={bad}"])
        assert f"{group}.{key}" in line and "not allowed" in line and "\n" not in line, line

    line = composition_error([*base, f"{group}.no_such_key=1"])
    first_field = dataclasses.fields(SCHEMAS[group][option])[0].name
    assert f"{group}.no_such_key is not a known key; allowed:" in line and first_field in line and "\n" not in line, line


def test_an_added_key_is_refused_too():
    """``+sparsity.common=1`` passes Hydra's struct check (``+`` adds keys); validate refuses it."""
    with pytest.raises(ConfigError, match=r"sparsity.common is not a known key; allowed: .*t_f"):
        validate(compose_config(["+sparsity.common=1"]))
    with pytest.raises(ConfigError, match=r"data.loader.shuffle is not a known key; allowed: .*batch_size"):
        validate(compose_config(["+data.loader.shuffle=true"]))


def test_a_missing_group_option_lists_the_real_ones():
    with pytest.raises(MissingConfigException) as info:
        compose_config(["model=nope"])
    line = str(as_config_error(info.value))
    assert line.startswith("model=nope is not a known option of the model group; choose from:")
    assert "resnet_small" in line and "base_" not in line and "\n" not in line


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("schedule.epochs=0", "schedule.epochs"),
        ("schedule.warmup_epochs=40", "schedule.warmup_epochs"),
        ("schedule.min_lr=1", "schedule.min_lr"),
        ("trainer.device=tpu", "trainer.device"),
        ("trainer.amp=fp8", "trainer.amp"),
        ("trainer.max_steps_per_epoch=0", "trainer.max_steps_per_epoch"),
        ("trainer.ema_decay=1.5", "trainer.ema_decay"),
        ("optim.name=lamb", "optim.name"),
        ("sparsity.t_f=-1", "sparsity.t_f"),
        ("sparsity.rounding=up", "sparsity.rounding"),
        ("sparsity.pattern=4:4", "sparsity.pattern"),
        ("data.loader.batch_size=0", "data.loader.batch_size"),
        ("data.augment.mixup=-1", "data.augment.mixup"),
        ("seed=-1.5", "seed"),
    ],
)
def test_bad_values_raise_one_line_naming_the_key(override, key):
    with pytest.raises((ConfigError, ConfigCompositionException)) as e:
        validate(compose_config([override]))
    text = str(as_config_error(e.value))
    assert key in text and "\n" not in text, text


def test_exclude_given_as_one_string_is_one_glob():
    typed = validate(compose_config(["sparsity.exclude=fc"]))
    assert typed["sparsity"].exclude == ["fc"]


def test_sparsity_schemas_are_the_method_options():
    """A method's schema is its registered options dataclass, and its constructor takes that object: no
    keyword copies of the keys or defaults to drift apart (tests/sparsity/test_options.py checks more)."""
    import inspect

    from lbc.sparsity import METHODS

    assert SCHEMAS["sparsity"] and SCHEMAS["sparsity"] == METHODS.schemas()
    for method, schema in SCHEMAS["sparsity"].items():
        cls = METHODS.get(method)
        assert cls.Options is schema and dataclasses.fields(schema)[0].default == method
        assert list(inspect.signature(cls.__init__).parameters) == ["self", "model", "options", "input_size"]

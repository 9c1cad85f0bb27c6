"""Models by name: every config option and registered model builds and trains a step; any timm or
torchvision name builds by prefix or ``source``; nothing downloads; unknown names are one line."""

from __future__ import annotations

import socket

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lbc.config import SCHEMAS, CausalLMConfig, DetectorConfig
from lbc.errors import ConfigError
from lbc.models import MODELS, SOURCES, build_model, resolve
from tests.helpers import CONFIGS, compose_config

# Classification model options; the detection ones (mmdet detectors) are tested in tests/detection/test_config.py,
# the language models (task=lm) in tests/lm/.
OPTIONS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")
                 if not issubclass(SCHEMAS["model"].get(p.stem, object), (DetectorConfig, CausalLMConfig)))


def one_step(model: nn.Module, batch: int, input_size: tuple[int, ...], num_classes: int) -> None:
    """One SGD step: the output shape is (batch, num_classes), the loss finite and every parameter moves."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, *input_size), torch.arange(batch) % num_classes
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    assert out.shape == (batch, num_classes)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed == len(before), f"{len(before) - changed} parameter tensors did not move"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any attempt to open a network connection fails the test; no weight cache to fall back on."""

    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_model_config_builds_and_trains_one_step(option, offline):
    cfg = compose_config([f"model={option}"])  # digits data: 3x32x32, 10 classes
    model = build_model(num_classes=7, **OmegaConf.to_container(cfg.model, resolve=True))
    one_step(model, 4, tuple(cfg.data.input_size), 7)


@pytest.mark.parametrize("option", OPTIONS)
def test_every_model_config_names_its_source_and_model(option):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{option}.yaml")
    assert cfg.name == option and cfg.source in SOURCES
    assert resolve(cfg.name, cfg.source) == (cfg.source, option)
    assert "num_classes" not in cfg  # the trainer passes num_classes from the data set


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_has_a_config_and_trains(name):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    assert cfg.source == "lbc"
    one_step(build_model(name, num_classes=5), 4, (3, 32, 32), 5)


def test_our_registry_holds_only_our_models():
    assert MODELS.names() == ["resnet_small"]


@pytest.mark.parametrize(
    ("name", "source", "module"),
    [
        ("timm/test_vit", None, "timm.models.vision_transformer"),
        ("test_resnet", "timm", "timm.models.resnet"),
        ("timm/deit_small_patch16_224.fb_in1k", None, "timm.models.vision_transformer"),  # a pretrained tag
        ("torchvision/squeezenet1_1", None, "torchvision.models.squeezenet"),
        ("shufflenet_v2_x0_5", "torchvision", "torchvision.models.shufflenetv2"),
        ("resnet18", None, "torchvision.models.resnet"),  # torchvision before timm when both have it
        ("resnet18", "timm", "timm.models.resnet"),
        ("timm/resnet18", "timm", "timm.models.resnet"),  # prefix and source may agree
        ("lbc/resnet_small", None, "lbc.models.resnet_small"),
    ],
)
def test_any_timm_or_torchvision_name_builds_by_prefix_or_source(name, source, module, offline):
    kwargs = {"img_size": 32} if "deit" in name else {}
    model = build_model(name, num_classes=3, source=source, **kwargs)
    assert type(model).__module__ == module
    size = 32 if "deit" in name else 64
    assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_a_detection_backbone_is_not_downloaded_either(offline):
    # torchvision's detection builders default to downloading ImageNet backbone weights.
    model = build_model("torchvision/fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3)
    assert type(model).__name__ == "FasterRCNN" and model.roi_heads.box_predictor.cls_score.out_features == 3


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("deit_smal_patch16_224", None, r"model\.name='deit_smal_patch16_224' is not a model in lbc, torchvision or timm; "
                                        r"close matches: timm/deit_small_patch16_224"),
        ("torchvision/resnet5", None, r"model\.name='torchvision/resnet5' is not a torchvision model.*torchvision/resnet50"),
        ("resnet5", "torchvision", r"\(model\.source=torchvision\); close matches: .*torchvision/resnet50"),
        ("resnet_smal", None, r"close matches: lbc/resnet_small"),
        ("nope", None, r"model\.name='nope' is not a model.*timm\.list_models"),
        ("resnet50", "keras", r"model\.source='keras' is not allowed; choose from: lbc, torchvision, timm"),
        ("timm/resnet50", "torchvision", r"model\.name='timm/resnet50' says source timm but model\.source='torchvision'"),
        ("hf-hub:timm/resnet50", None, r"model\.name='hf-hub:timm/resnet50': hub names download"),
    ],
)
def test_unknown_names_are_one_line_with_a_few_close_matches(name, source, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        build_model(name, num_classes=10, source=source)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert message.count("/") <= 6  # a few matches, not the thousands of names timm knows


@pytest.mark.parametrize(("key", "value"), [("pretrained", True), ("weights", "DEFAULT"), ("weights_backbone", "DEFAULT")])
def test_asking_for_weights_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        build_model("resnet18", num_classes=10, **{key: value})


def test_resnet_small_layout_suits_nm_patterns_up_to_1_16():
    model = build_model("resnet_small", num_classes=10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert "conv1" in convs and isinstance(model.fc, nn.Linear)
    assert convs["conv1"].stride == (1, 1) and not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    rest = {n: m.in_channels for n, m in convs.items() if n != "conv1"}
    assert len(rest) >= 6 and all(c % 16 == 0 for c in rest.values()), rest
    assert model.fc.in_features % 16 == 0
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_resnet_small_widths_and_blocks_are_configurable():
    model = build_model("resnet_small", num_classes=3, widths=[32, 48], blocks=[1, 3], in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.in_features == 48
    assert [len(stage) for stage in model.layers] == [1, 3]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("widths", [[16, 24], [0, 32]])
def test_resnet_small_rejects_widths_not_multiple_of_16(widths):
    with pytest.raises(ConfigError, match="model.widths"):
        build_model("resnet_small", num_classes=10, widths=widths, blocks=[1, 1])


def test_deit_takes_img_size_and_drop_path_from_kwargs():
    model = build_model("deit_small_patch16_224", num_classes=5, img_size=32, drop_path_rate=0.1)
    assert model.patch_embed.img_size == (32, 32) and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_extra_keywords_reach_the_builder_and_unknown_ones_are_one_line():
    model = build_model("timm/deit_tiny_patch16_224", num_classes=3, extra={"depth": 2, "img_size": 32})
    assert len(model.blocks) == 2 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ConfigError, match=r"model.name='resnet_small' \(lbc\) does not take the option 'foo'"):
        build_model("resnet_small", num_classes=3, foo=1)

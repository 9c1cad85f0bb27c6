"""Every registered model builds, maps its input size to (B, num_classes) and trains one step."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lbc.errors import ConfigError
from lbc.models import MODELS, build_model
from tests.helpers import CONFIGS

INPUT = {"resnet_small": (8, 32), "resnet18": (2, 64), "resnet50": (2, 64), "deit_small_patch16_224": (2, 224)}


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_shape_and_one_training_step(name):
    torch.manual_seed(0)
    batch, size = INPUT[name]
    model = build_model(name, num_classes=7)
    x, y = torch.randn(batch, 3, size, size), torch.arange(batch) % 7
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    assert out.shape == (batch, 7)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed == len(before), f"{len(before) - changed} parameter tensors did not move"


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_has_a_config_file_naming_it(name):
    cfg = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    assert cfg.name == name
    assert "num_classes" not in cfg  # the trainer passes num_classes from the data set


def test_every_model_config_is_registered():
    assert sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")) == MODELS.names()


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


def test_unknown_model_name_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"model\.name='nope'.*resnet_small"):
        build_model("nope", num_classes=10)


def test_deit_takes_img_size_and_drop_path_from_kwargs():
    model = build_model("deit_small_patch16_224", num_classes=5, img_size=32, drop_path_rate=0.1)
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)

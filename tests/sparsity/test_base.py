"""Layer selection (defaults, globs, strict), the dense-key mapping and the cached float masks."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.base import default_dense_layers, float_view


def test_resnet_defaults_keep_stem_and_classifier_dense():
    model = torchvision.models.resnet18()
    sp = lbc.sparsify(model, method="dense", pattern="2:4")
    assert default_dense_layers(model) == ["conv1", "fc"]
    assert set(sp.dense_reasons) == {"conv1", "fc"}
    assert "layer1.0.conv1" in sp.layers and "layer2.0.downsample.0" in sp.layers
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(sp.layers) == len(convs) - 2


def test_timm_deit_defaults_come_from_its_pretrained_cfg():
    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=1, img_size=32)
    sp = lbc.sparsify(model, method="dense", pattern="2:4")
    assert set(sp.dense_reasons) == {"patch_embed.proj", "head"}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} == set(sp.layers)


def test_exclude_globs_and_report_reasons():
    model = torchvision.models.resnet18()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_f=2, exclude=["conv1", "fc", "layer4.*"])
    assert not any(name.startswith("layer4") for name in sp.layers)
    rows = {row["name"]: row for row in sp.report()["layers"]}
    assert rows["layer4.1.conv2"]["dense_reason"] == "excluded by 'layer4.*'"
    assert rows["layer4.1.conv2"]["density"] == 1.0 and "nm" in rows["layer3.1.conv2"]


def test_ineligible_layers_are_dense_with_a_reason_or_an_error_when_strict():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8, 6), nn.Linear(6, 2))
    sp = lbc.sparsify(model, method="dense", pattern="2:4", exclude=[])
    assert set(sp.layers) == {"1", "3"}
    assert "input dimension 3 is not divisible by M=4" in sp.dense_reasons["0"]
    with pytest.raises(ConfigError, match=r"sparsity.strict.*'0'.*divisible") as err:
        lbc.sparsify(nn.Sequential(*copy.deepcopy(list(model))), method="dense", pattern="2:4", exclude=[],
                     strict=True)
    assert "\n" not in str(err.value)


def test_float_view_follows_in_place_changes_and_copies():
    holder = nn.Module()
    holder.register_buffer("mask", torch.ones(4, dtype=torch.bool))
    first = float_view(holder, "mask", torch.float32)
    assert float_view(holder, "mask", torch.float32) is first  # cached while unchanged
    holder.mask[1] = False
    assert float_view(holder, "mask", torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0]
    twin = copy.deepcopy(holder)
    twin.mask.copy_(torch.tensor([False, True, True, True]))
    assert float_view(twin, "mask", torch.float32).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert float_view(holder, "mask", torch.float32).tolist() == [1.0, 0.0, 1.0, 1.0]
    holder.load_state_dict({"mask": torch.tensor([True, True, False, False])})
    assert float_view(holder, "mask", torch.float64).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_attaching_twice_is_refused_until_detached():
    model = torchvision.models.resnet18()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", t_f=2)
    with pytest.raises(ConfigError, match="already has a reparametrised weight") as err:
        lbc.sparsify(model, method="srste", pattern="2:4")
    assert "\n" not in str(err.value)
    sp.detach()
    again = lbc.sparsify(model, method="srste", pattern="2:4")
    assert again.is_exact_nm()

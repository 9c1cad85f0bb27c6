"""Layer selection (paper: stem and classifier dense): defaults, globs, reasons, strict; pure."""

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

import lbc
from lbc.errors import ConfigError
from lbc.sparsity import METHODS
from lbc.sparsity.selection import default_dense_layers, select_layers


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
    with pytest.raises(ConfigError, match=r"sparsity.strict.*'0'"):
        select_layers(model, "2:4", exclude=[], strict=True)


def test_grouped_conv_eligibility_reads_the_input_channels_per_group():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, groups=4))
    selection = select_layers(model, "2:4", exclude=[])
    assert list(selection.layers) == ["1"]  # 4 inputs per group; "2" has 2
    assert "input dimension 2 is not divisible by M=4" in selection.dense_reasons["2"]


def test_a_string_exclude_is_one_glob():
    model = torchvision.models.resnet18()
    one = select_layers(model, "2:4", exclude="layer4.*")
    assert one.exclude == ["layer4.*"]
    assert not any(n.startswith("layer4") for n in one.layers)
    assert "fc" in one.layers and "layer3.1.conv2" in one.layers  # not "l", "a", "y", ... globs
    assert one.dense_reasons["layer4.0.conv1"] == "excluded by 'layer4.*'"
    sp = lbc.sparsify(model, method="dense", exclude="fc")
    assert sp.dense_reasons == {"conv1": "input dimension 3 is not divisible by M=4", "fc": "excluded by 'fc'"}
    assert sp.exclude == ["fc"]


@pytest.mark.parametrize("method", ["dense", "lbc", "srste", "asp"])
def test_select_layers_is_pure_and_matches_the_method(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selection = select_layers(model, "2:8", exclude=None)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing attached
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    assert selection.exclude == ["conv1", "fc"]
    options = {"t_f": 2} if method == "lbc" else {}
    cls = METHODS.get(method)
    sp = cls(model, cls.Options(method=method, pattern="2:8", **options))  # the constructor, given checked options
    assert list(sp.layers) == list(selection.layers)
    assert all(sp.layers[n] is m for n, m in selection.layers.items())
    assert sp.dense_reasons == selection.dense_reasons
    again = select_layers(model, "2:8")  # on a model with the method attached: same answer, no forward
    assert list(again.layers) == list(selection.layers) and again.dense_reasons == selection.dense_reasons

"""lbc.accelerate: a clear no-op without a suitable GPU; 1x1 convolutions as matmuls; the right layers chosen;
on a GPU with sparse tensor cores (when one is lent) the converted model computes what the dense one does."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

import lbc
from lbc.accelerate import (
    Conv1x1AsLinear,
    accelerate,
    candidates,
    convs_as_linear,
    hardware_reason,
    layer_reason,
)
from lbc.models import build_model
from lbc.sparsity import select_layers

GPU = hardware_reason()


def pruned(model: nn.Module) -> nn.Module:
    """``model`` with the layers training would select made 2:4 (input channels 2 and 3 of every 4 zeroed), in place."""
    with torch.no_grad():
        for layer in select_layers(model, "2:4").layers.values():
            layer.weight[:, 2::4] = 0
            layer.weight[:, 3::4] = 0
    return model.eval()


def test_without_a_gpu_nothing_changes_and_one_line_says_why(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = pruned(build_model("resnet_small", num_classes=10))
    before = copy.deepcopy(model.state_dict())
    kinds = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="lbc"):
        result = lbc.accelerate(model, dtype=torch.float16)
    assert not result and result.converted == [] and "CUDA is not available" in result.reason
    assert [r.getMessage() for r in caplog.records] == [str(result)]
    assert str(result).startswith("lbc.accelerate: nothing converted: CUDA is not available") and "\n" not in str(result)
    assert [type(m) for m in model.modules()] == kinds
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert lbc.accelerate is accelerate


def test_other_reasons_name_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU somewhere, but the model is on the CPU
    assert "move it to the GPU" in hardware_reason(torch.device("cpu"))
    result = accelerate(build_model("resnet_small", num_classes=10), quiet=True)
    assert "move it to the GPU" in result.reason


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_1x1_convolution_as_a_matmul_is_the_same_function(stride, channels_last):
    conv = nn.Conv2d(32, 48, 1, stride=stride, bias=stride == 1)
    x = torch.randn(2, 32, 9, 7)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        torch.testing.assert_close(Conv1x1AsLinear(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_resnet50_bottleneck_1x1_convolutions_become_matmuls():
    model = torchvision.models.resnet50(num_classes=10).eval()
    reference = copy.deepcopy(model)
    replaced = convs_as_linear(model)
    assert len(replaced) == 16 * 2 + 4  # conv1 and conv3 of 16 bottlenecks, 4 downsamples; not the stem or 3x3s
    assert all(n.endswith(("conv1", "conv3", "downsample.0")) and n != "conv1" for n in replaced)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_the_layers_chosen_are_the_2_4_ones_of_supported_shapes():
    deit = pruned(build_model("deit_small_patch16_224", num_classes=10, img_size=32, depth=2))  # DeiT-S's blocks, 2 of them
    ok, skipped = candidates(deit, "cusparselt", torch.float16)
    suffixes = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert len(ok) == 2 * 4 and all(n.startswith("blocks.") and n.endswith(suffixes) for n in ok)
    assert skipped == {"head": "shape 10x384 is not a multiple of 16x16 (cusparselt)"}  # patch_embed is 16x16: not 1x1

    resnet = pruned(torchvision.models.resnet50(num_classes=1000))
    ok, skipped = candidates(resnet, "cusparselt", torch.bfloat16)
    assert len(ok) == 36 and skipped == {"fc": "shape 1000x2048 is not a multiple of 16x16 (cusparselt)"}
    assert candidates(resnet, "cusparselt", torch.float16, convs=False)[0] == []

    dense = torch.randn(64, 64)
    assert layer_reason(dense, "cusparselt", torch.float16) == "weight is not 2:4 along its input dimension"
    assert "float32" in layer_reason(dense, "cusparselt")
    assert "not a multiple of 32x64" in layer_reason(torch.zeros(64, 96), "cutlass", torch.float16)


@pytest.mark.skipif(GPU is not None, reason=f"needs a GPU with 2:4 sparse tensor cores: {GPU}")
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "resnet50"])
def test_on_a_sparse_tensor_core_gpu_the_accelerated_model_matches(name):
    options = {"img_size": 224} if name.startswith("deit") else {}
    dense = pruned(build_model(name, num_classes=1000, **options)).cuda().half()
    sparse = copy.deepcopy(dense)
    result = accelerate(sparse)
    assert len(result.converted) == (48 if name.startswith("deit") else 36), result
    assert type(sparse.get_submodule(result.converted[0]).weight).__name__.startswith("SparseSemiStructuredTensor")
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x).float(), dense(x).float(), rtol=2e-2, atol=2e-2)

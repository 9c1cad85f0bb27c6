"""On a CUDA GPU (``pytest -m cuda``; scripts/gpu_check.sh runs them on a lent machine): mixed-precision and
compiled training end exactly N:M, masks chosen on the GPU equal the CPU's, lbc.accelerate's 2:4 kernels
compute what the dense model does, and task=lm trains in bf16. Skipped where CUDA is not available."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import lbc
import lbc.engine.trainer as trainer
from lbc.engine import checkpoint
from lbc.models import build_model
from lbc.sparsity.nm import NMPattern, is_exactly_nm

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = ["trainer.device=cuda"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda_ends_exactly_2_4(make_config, tmp_path, amp):
    result = trainer.run(make_config(*CUDA, f"trainer.amp={amp}", "sparsity=lbc"))
    rows = records(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert result["sparsity/exact_nm"] == 1.0 and 0 <= result["top1"] <= 100
    scaler = checkpoint.load(tmp_path / "run" / "last.pt")["scaler"]
    assert bool(scaler) == (amp == "fp16")  # fp16 trains with a GradScaler (its state is saved); bf16 needs none
    if amp == "fp16":
        assert scaler["scale"] > 0


@pytest.mark.parametrize("method", ["dense", "lbc", "srste", "asp"])
def test_compiled_training_on_cuda(make_config, tmp_path, method):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    result = trainer.run(make_config(*CUDA, "trainer.compile=true", f"sparsity={method}"))
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through torch.compile
    assert all(math.isfinite(r["train_loss"]) for r in records(tmp_path / "run"))
    if method == "dense":
        assert result["sparsity/density"] == 1.0 and result["sparsity/exact_nm"] == 0.0
    else:  # 2 epochs: LBC's t_f and ASP's prune fall at epoch 1, SR-STE is 2:4 from the start
        assert result["sparsity/exact_nm"] == 1.0 and 0.5 <= result["sparsity/density"] < 0.6


def _twins(method: str, **options):
    """The same resnet_small (same seed) and method on the CPU and on the GPU; LBC's scores copied across."""
    torch.manual_seed(0)
    cpu_model = build_model("resnet_small", num_classes=10)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu, gpu = (lbc.sparsify(m, method=method, pattern="2:4", **options) for m in (cpu_model, gpu_model))
    if method == "lbc":
        gen = torch.Generator().manual_seed(1)
        for name in cpu.layers:
            a = cpu.layers[name].parametrizations.weight[0].scores
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=gen))
                gpu.layers[name].parametrizations.weight[0].scores.copy_(a)
    return (cpu_model, cpu), (gpu_model, gpu)


def _same_masks(cpu, gpu) -> None:
    a, b = cpu.masks(), gpu.masks()
    assert a and a.keys() == b.keys()
    for name in a:
        assert b[name].is_cuda and torch.equal(a[name], b[name].cpu()), name


@pytest.mark.parametrize("method,options", [
    ("lbc", {"t_i": 0, "t_f": 3}),
    ("lbc", {"t_i": 0, "t_f": 3, "criterion": "magnitude"}),
    ("srste", {}),
    ("asp", {"dense_epochs": 0}),
])
def test_masks_chosen_on_cuda_equal_the_cpu_masks(method, options):
    (cpu_model, cpu), (gpu_model, gpu) = _twins(method, **options)
    x = torch.randn(4, 3, 32, 32)
    for epoch in range(4):
        cpu.update(epoch)
        gpu.update(epoch)
        _same_masks(cpu, gpu)
    cpu_model.train()(x)  # SR-STE writes the mask of a training forward
    gpu_model.train()(x.cuda())
    _same_masks(cpu, gpu)
    assert cpu.is_exact_nm() and gpu.is_exact_nm()
    if method == "asp":  # the pruned stored weights are zeroed alike
        for name, layer in cpu.layers.items():
            w = layer.parametrizations.weight.original
            assert torch.equal(w, gpu.layers[name].parametrizations.weight.original.cpu()), name


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_accelerated_2_4_model_matches_the_dense_one_on_cuda(dtype, tolerance):
    from lbc.accelerate import accelerate, hardware_reason
    from tests.export.test_accelerate import pruned

    if torch.cuda.get_device_capability() >= (8, 0):
        assert hardware_reason() is None  # sm80+ with torch's 2:4 kernels: nothing may stand in the way
    else:
        pytest.skip(hardware_reason())
    dense = pruned(build_model("deit_small_patch16_224", num_classes=1000, img_size=224, depth=2)).cuda().to(dtype)
    sparse = copy.deepcopy(dense)
    result = accelerate(sparse, dtype=dtype)
    assert len(result.converted) == 2 * 4, result  # qkv, proj, fc1, fc2 of both blocks
    assert type(sparse.get_submodule(result.converted[0]).weight).__name__.startswith("SparseSemiStructuredTensor")
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x).float(), dense(x).float(), rtol=tolerance, atol=tolerance)


def test_lm_trains_in_bf16_on_cuda_and_ends_exactly_2_4(tmp_path):
    from lbc.lm import runner
    from tests.lm.test_runner import PROJECTIONS, lm_config, masks_of  # skips where transformers is missing

    result = runner.run(lm_config(tmp_path, *CUDA, "trainer.amp=bf16", "sparsity=lbc", "sparsity.t_f=3"))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    masks = masks_of(ckpt)
    assert len(masks) == PROJECTIONS["llama_tiny"] and all(is_exactly_nm(m, NMPattern(2, 4)) for m in masks.values())
    rows = records(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 6] and all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert result["sparsity/exact_nm"] == 1.0 and rows[0]["sparsity/density"] > rows[-1]["sparsity/density"]

"""Record the masks, outputs and gradients of every method into ``golden.safetensors``.

Written once, on the code that was checked against the authors' released code, the SR-STE
reference and apex ASP, before lbc/sparsity was refactored; ``tests/sparsity/test_pinned.py``
recomputes every scenario and asserts bit-for-bit equality. Never rerun this to make that test
pass: a difference is a change of behaviour.

    .venv/bin/python -m tests.sparsity.pinned.make_pinned

Weights, inputs and upstream gradients are dyadic rationals (k / 2^j, small k) and the learning
rate, momentum and ``lambda_w`` are powers of two, so every sum and product below is exact in
float32: the results do not depend on summation order, thread count or BLAS kernel. Each
scenario checks that against a float64 recomputation. Ties in ``|w|`` are pinned only for
M <= 8; for M > 8 today's ``topn_mask`` uses ``topk``, whose order on ties is unspecified, so
those scenarios use weights without ties at the N-th place.
"""

from __future__ import annotations

import importlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lbc
from lbc.sparsity.nm import candidate_matrix, from_groups, parse_pattern, to_groups

GOLDEN = Path(__file__).with_name("golden.safetensors")

Record = tuple[dict[str, torch.Tensor], dict[str, str]]


def kernel(name: str) -> Callable[..., Any]:
    """``topn_mask`` or ``removal_position``: from ``nm`` if it lives there, else from the method module
    that held it when the pins were written (so this file need not change when functions move)."""
    for module in ("lbc.sparsity.nm", "lbc.sparsity.srste", "lbc.sparsity.lbc"):
        fn = getattr(importlib.import_module(module), name, None)
        if fn is not None:
            return fn
    raise ImportError(f"no {name} in lbc.sparsity")


# --- data ---------------------------------------------------------------------------------------
def dyadic(shape: tuple[int, ...], gen: torch.Generator, levels: int, bound: int) -> torch.Tensor:
    """Uniform multiples of ``1 / levels`` in ``[-bound / levels, bound / levels]`` (ties likely)."""
    return torch.randint(-bound, bound + 1, shape, generator=gen).float() / levels


def tied(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights on a coarse grid (multiples of 1/8 in [-1, 1]): equal ``|w|`` in most groups."""
    return dyadic(shape, gen, 8, 8)


def distinct_magnitudes(shape: tuple[int, ...], m: int, gen: torch.Generator) -> torch.Tensor:
    """Dyadic weights whose ``|w|`` are all different inside every group of M (no ties at all)."""
    groups = int(torch.tensor(shape).prod()) // m
    levels = torch.stack([torch.randperm(4 * m, generator=gen)[:m] + 1 for _ in range(groups)]).float() / 64
    signs = torch.randint(0, 2, levels.shape, generator=gen).float() * 2 - 1
    return from_groups(levels * signs, shape).contiguous()


class Pair(nn.Module):
    """A Conv2d and a Linear, each fed its own input (16 input channels: every pattern fits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 2, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x_conv: torch.Tensor, x_fc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x_conv), self.fc(x_fc)


def make_pair(gen: torch.Generator, m: int, ties: bool) -> Pair:
    model = Pair()
    with torch.no_grad():
        for layer in (model.conv, model.fc):
            shape = tuple(layer.weight.shape)
            layer.weight.copy_(tied(shape, gen) if ties else distinct_magnitudes(shape, m, gen))
            layer.bias.copy_(dyadic(tuple(layer.bias.shape), gen, 4, 4))
    return model


def batch(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Inputs and upstream gradients of both layers (dyadic)."""
    return (dyadic((2, 16, 3, 3), gen, 4, 8), dyadic((2, 16), gen, 4, 8),
            dyadic((2, 2, 3, 3), gen, 4, 8), dyadic((2, 4), gen, 4, 8))


def stored(layer: nn.Module) -> nn.Parameter:
    return layer.parametrizations.weight.original


def state(layer: nn.Module) -> nn.Module:
    return layer.parametrizations.weight[0]


# --- exactness checks (float64 recomputation) ---------------------------------------------------
def upstream64(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 output and dL/dW_eff of ``layer`` for input ``x`` and output gradient ``g``."""
    w = layer.weight.detach().double().requires_grad_(True)
    b = layer.bias.detach().double()
    if isinstance(layer, nn.Conv2d):
        out = F.conv2d(x.double(), w, b, padding=layer.padding)
    else:
        out = F.linear(x.double(), w, b)
    (grad,) = torch.autograd.grad((out * g.double()).sum(), w)
    return out.detach(), grad


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    if not torch.equal(got.double(), expected.double()):
        raise AssertionError(f"{name} differs from its float64 recomputation: the formula changed, or float32 "
                             "is not exact here (then the pins are fragile on this machine)")


def forward_backward(model: Pair, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One forward and backward of both layers; returns outputs and, per layer, float64 references."""
    xc, xf, gc, gf = batch(gen)
    refs = {"conv": upstream64(model.conv, xc, gc), "fc": upstream64(model.fc, xf, gf)}
    oc, of = model(xc, xf)
    ((oc * gc).sum() + (of * gf).sum()).backward()
    check("conv out", oc, refs["conv"][0])
    check("fc out", of, refs["fc"][0])
    return {"conv": oc.detach(), "fc": of.detach()}, refs


def sgd(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1 / 8, momentum=1 / 2)


# --- scenarios ----------------------------------------------------------------------------------
def topn(pattern: str, data: str) -> Record:
    """``topn_mask`` on a Linear- and a Conv-shaped weight."""
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(p.n * 100 + p.m)
    out = {}
    for kind, shape in (("linear", (8, 16)), ("conv", (4, 16, 3, 3))):
        if data == "ties":  # coarse levels: many equal |w|, zeros and signed pairs
            weight = dyadic(shape, gen, 4, 4)
        else:
            weight = torch.randn(shape, generator=gen)
        out[f"{kind}/mask"] = kernel("topn_mask")(weight, p)
    return out, {}


def removal(candidates: int) -> Record:
    """``removal_position`` (ascending rank, ties by index; removed candidates at +inf)."""
    gen = torch.Generator().manual_seed(candidates)
    ties = torch.randint(0, 3, (64, candidates), generator=gen).float()
    ties[ties == 2] = float("inf")
    smooth = torch.randn(64, candidates, generator=gen)
    smooth[:, ::3] = float("inf")
    out = {}
    for name, values in (("ties", ties), ("randn", smooth)):
        out[f"{name}/position"] = kernel("removal_position")(values)
    return out, {}


def lbc_run(pattern: str, criterion: str, rounding: str, update_every: str) -> Record:
    """LBC through its whole schedule (t_i=0, t_f=4) with SGD steps and hand-set (tied) scores."""
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(7 * p.m + p.n)
    model = make_pair(gen, p.m, ties=True)
    score_init = "released" if rounding == "released" else "paper"
    sp = lbc.sparsify(model, method="lbc", pattern=pattern, exclude=[], t_i=0, t_f=4, rounding=rounding,
                      update_every=update_every, criterion=criterion, score_init=score_init)
    assert set(sp.layers) == {"conv", "fc"}
    opt = sgd([stored(model.conv), model.conv.bias, stored(model.fc), model.fc.bias, *sp.score_parameters()])
    epochs = [0, 1, 2, 3, 4] if update_every == "epoch" else [0, 0.5, 1, 1.5, 2.25, 3, 4]
    out: dict[str, torch.Tensor] = {}
    removed = []
    for step, epoch in enumerate(epochs):
        if step == 1:  # scores set by hand, with many ties, in half of the groups
            with torch.no_grad():
                for scores in sp.score_parameters():
                    half = scores.shape[0] // 2
                    scores[:half] = torch.randint(0, 3, (half, scores.shape[1]), generator=gen).float()
        sp.update(epoch)
        removed.append(sp.removed)
        outputs, refs = forward_backward(model, gen)
        for name in ("conv", "fc"):
            layer, key = getattr(model, name), f"{step}/{name}"
            s = state(layer)
            out[f"{key}/alive"] = s.alive.clone()
            out[f"{key}/mask"] = s.mask.clone()
            out[f"{key}/out"] = outputs[name]
            grad = stored(layer).grad
            out[f"{key}/weight_grad"] = grad.clone()
            g_eff = refs[name][1]
            check(f"{key} weight grad", grad, s.mask.double() * g_eff)
            if s.scores.grad is not None:
                out[f"{key}/score_grad"] = s.scores.grad.clone()
                members = to_groups(stored(layer).detach().double() * g_eff, p.m)
                eq9 = (members @ candidate_matrix(p).double().T) * s.alive.double()
                check(f"{key} score grad", s.scores.grad, eq9)
            if s.grad_accum is not None:
                out[f"{key}/grad_accum"] = s.grad_accum.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["removed"] = torch.tensor(removed)
    return out, {"state_dict": json.dumps(sp.state_dict(), sort_keys=True)}


def srste_run(pattern: str) -> Record:
    """SR-STE: training-mode mask buffer, ``mask * W`` outputs and dense + lambda_w weight gradients.

    Between forwards the weights are set by hand: with ``lambda_w`` in the gradient, optimizer
    steps would soon leave the exactly representable range (see the module docstring)."""
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(11 * p.m + p.n)
    ties = p.m <= 8
    model = make_pair(gen, p.m, ties=ties)
    lam = 1 / 8
    sp = lbc.sparsify(model, method="srste", pattern=pattern, exclude=[], lambda_w=lam)
    out: dict[str, torch.Tensor] = {}
    for step in range(3):
        if step:  # new weights by hand (an optimizer step would make them inexact): a new mask
            with torch.no_grad():
                for layer in (model.conv, model.fc):
                    shape = tuple(stored(layer).shape)
                    stored(layer).copy_(tied(shape, gen) if ties else distinct_magnitudes(shape, p.m, gen))
        sp.update(step)
        outputs, refs = forward_backward(model, gen)
        for name in ("conv", "fc"):
            layer, key = getattr(model, name), f"{step}/{name}"
            mask = state(layer).mask
            out[f"{key}/mask"] = mask.clone()
            out[f"{key}/out"] = outputs[name]
            grad = stored(layer).grad
            out[f"{key}/weight_grad"] = grad.clone()
            expected = refs[name][1] + lam * (~mask).double() * stored(layer).detach().double()
            check(f"{key} weight grad", grad, expected)
            stored(layer).grad = None
    return out, {}


def asp_run(pattern: str, dense_epochs: int) -> Record:
    """ASP: dense steps, the prune at ``dense_epochs``, masked steps; stored weights re-zeroed.

    Everything is recorded after ``update(epoch)``: with ``dense_epochs=0`` the records are the same
    whether the prune happens in the constructor or at the first ``update``."""
    p = parse_pattern(pattern)
    gen = torch.Generator().manual_seed(13 * p.m + p.n + dense_epochs)
    ties = p.m <= 8
    model = make_pair(gen, p.m, ties=ties)
    sp = lbc.sparsify(model, method="asp", pattern=pattern, exclude=[], dense_epochs=dense_epochs,
                      finetune_epochs=1)
    opt = sgd([stored(model.conv), model.conv.bias, stored(model.fc), model.fc.bias])
    out: dict[str, torch.Tensor] = {}
    epochs = [e + dense_epochs for e in (-1, -0.5, 0, 0.5, 1) if e + dense_epochs >= 0]
    for step, epoch in enumerate(epochs):
        if epoch == dense_epochs > 0:  # the prune sees ties (M <= 8) or none at all (M > 8)
            with torch.no_grad():
                for layer in (model.conv, model.fc):
                    shape = tuple(stored(layer).shape)
                    stored(layer).copy_(tied(shape, gen) if ties else distinct_magnitudes(shape, p.m, gen))
        sp.update(epoch)
        for name in ("conv", "fc"):
            layer, key = getattr(model, name), f"{step}/{name}"
            out[f"{key}/mask"] = state(layer).mask.clone()
            out[f"{key}/weight"] = stored(layer).detach().clone()  # zeroed at the prune and every update
        outputs, refs = forward_backward(model, gen)
        for name in ("conv", "fc"):
            layer, key = getattr(model, name), f"{step}/{name}"
            out[f"{key}/out"] = outputs[name]
            grad = stored(layer).grad
            out[f"{key}/weight_grad"] = grad.clone()
            check(f"{key} weight grad", grad, state(layer).mask.double() * refs[name][1])
        opt.step()
        opt.zero_grad(set_to_none=True)
    sp.finalize()
    out["exact_nm"] = torch.tensor(sp.is_exact_nm())
    return out, {"state_dict": json.dumps(sp.state_dict(), sort_keys=True),
                 "phases": json.dumps(sp.phases()), "milestones": json.dumps(sp.milestones())}


class Small(nn.Sequential):
    """Stem (3 inputs), two sparse-able layers and a classifier: the default selection at work."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 10))


REPORT_OPTIONS = {
    "dense": {},
    "lbc": {"t_i": 0, "t_f": 2, "update_every": "step"},
    "srste": {},
    "asp": {"dense_epochs": 1, "finetune_epochs": 2},
}


def report_run(method: str) -> Record:
    """Default layer selection, the training-FLOPs figures (MACs as costs) and the report."""
    torch.manual_seed(0)
    model = Small()
    sp = lbc.sparsify(model, method=method, pattern="2:4", input_size=(3, 6, 6), **REPORT_OPTIONS[method])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scores in sp.score_parameters():
            scores.copy_(torch.rand(scores.shape, generator=gen))
    epochs = [0, 0.5, 1, 1.5, 2, 2.5, 3]
    ratios, costs = [], []
    for epoch in epochs:
        sp.update(epoch)
        ratios.append(sp.train_flops_ratio())
        costs.append(sp.step_cost())
    ratios += [sp.train_flops_ratio(e) for e in (0.0, 0.25, 1.75, 2.0, 4.0)]
    out = {"train_flops_ratio": torch.tensor(ratios, dtype=torch.float64),
           "step_cost": torch.tensor(costs, dtype=torch.float64)}
    for name, mask in sp.masks().items():
        assert mask.dtype == torch.float32 and bool(((mask == 0) | (mask == 1)).all())
        out[f"mask/{name}"] = mask.bool()  # 0/1 floats, stored as bool to keep the file small
    meta = {
        "layers": json.dumps(list(sp.layers)),
        "dense_reasons": json.dumps(sp.dense_reasons),
        "report": json.dumps(sp.report(), sort_keys=True),
        "state_dict": json.dumps(sp.state_dict(), sort_keys=True),
    }
    return out, meta


def selection_run(model_name: str) -> Record:
    """Which layers a method selects on a real model, and why the others stay dense."""
    model = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}[model_name]()
    out = {}
    meta = {}
    for pattern in ("2:4", "1:16"):
        sp = lbc.sparsify(model, method="dense", pattern=pattern)
        meta[f"{pattern}/layers"] = json.dumps(list(sp.layers))
        meta[f"{pattern}/dense_reasons"] = json.dumps(sp.dense_reasons)
        out[f"{pattern}/count"] = torch.tensor(len(sp.layers))
    return out, meta


SCENARIOS: dict[str, Callable[[], Record]] = {}
for _pattern, _data in itertools.product(("2:4", "1:4", "3:4", "2:8", "4:8", "1:16"), ("ties", "randn")):
    if _data == "randn" or parse_pattern(_pattern).m <= 8:
        SCENARIOS[f"topn/{_pattern}/{_data}"] = lambda p=_pattern, d=_data: topn(p, d)
for _c in (4, 6, 8, 16, 28):
    SCENARIOS[f"removal_position/{_c}"] = lambda c=_c: removal(c)
for _run in (
    ("2:4", "score", "paper", "epoch"),
    ("1:4", "score", "paper", "epoch"),
    ("2:8", "score", "paper", "epoch"),
    ("1:16", "score", "paper", "epoch"),
    ("2:4", "score", "released", "epoch"),
    ("2:4", "score", "paper", "step"),
    ("2:4", "score_inverse", "paper", "epoch"),
    ("2:4", "magnitude", "paper", "epoch"),
    ("2:8", "magnitude", "paper", "epoch"),
    ("2:4", "gradient", "paper", "epoch"),
    ("1:16", "gradient", "released", "epoch"),
):
    SCENARIOS["lbc/" + "/".join(_run)] = lambda r=_run: lbc_run(*r)
for _pattern in ("2:4", "1:4", "2:8", "1:16"):
    SCENARIOS[f"srste/{_pattern}"] = lambda p=_pattern: srste_run(p)
for _pattern, _dense in (("2:4", 1), ("2:4", 0), ("1:4", 1), ("2:8", 1), ("1:16", 1), ("1:16", 0)):
    SCENARIOS[f"asp/{_pattern}/dense{_dense}"] = lambda p=_pattern, d=_dense: asp_run(p, d)
for _method in REPORT_OPTIONS:
    SCENARIOS[f"report/{_method}"] = lambda m=_method: report_run(m)
for _model in ("resnet18", "resnet50"):
    SCENARIOS[f"selection/{_model}"] = lambda m=_model: selection_run(m)


def compute(name: str) -> Record:
    """Tensors and metadata of scenario ``name``, keys prefixed with ``name/``."""
    tensors, meta = SCENARIOS[name]()
    prefix = name + "/"
    return ({prefix + k: v.contiguous() for k, v in tensors.items()}, {prefix + k: v for k, v in meta.items()})


def main() -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name in SCENARIOS:
        t, m = compute(name)
        tensors.update(t)
        meta.update(m)
    save_file(tensors, str(GOLDEN), metadata=meta)
    print(f"{GOLDEN}: {len(SCENARIOS)} scenarios, {len(tensors)} tensors, {GOLDEN.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()


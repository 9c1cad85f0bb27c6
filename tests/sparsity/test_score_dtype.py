"""LBC's ``score_dtype``: bfloat16 scores choose what float32 scores choose, in half the memory."""

import logging

import pytest
import torch
from torch import nn

import lbc
from lbc.engine.optim import build_optimizer, param_groups
from lbc.errors import ConfigError
from lbc.sparsity import lbc as lbc_module
from lbc.sparsity.nm import candidate_matrix, from_groups, to_groups

LOW = [torch.bfloat16]
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


STEPS = 8


def _train(dtype, optim, score_lr, seed):
    """The paper's recipe (score_init=paper, removal=paper), one removal at t_i = t_f = 1 after STEPS steps
    with every candidate alive: the forward never sees the scores before it, so both runs see the same
    weights and batches and differ only in how the scores are stored."""
    torch.manual_seed(seed)
    model = Net()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_i=1, t_f=1, score_dtype=NAMES[dtype])
    groups = param_groups(model, sp, 1e-4)
    groups[-1]["lr"] = score_lr  # the scores' group: large enough steps to decide most groups clearly
    optimizer = build_optimizer(optim, groups, lr=0.1, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(STEPS):
        sp.update(step / STEPS)
        x, y = torch.randn(16, 8, 5, 5, generator=gen), torch.randint(0, 8, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    states = [m.parametrizations.weight[0] for m in sp.layers.values()]
    scores = [s.scores.detach().float().clone() for s in states]
    weights = [m.parametrizations.weight.original.detach().clone() for m in sp.layers.values()]
    sp.update(1)  # all candidates but the best-scored go
    return scores, weights, [s.alive.clone() for s in states], optimizer, sp


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("optim, score_lr", [("sgd", 100.0), ("adamw", 0.3)])
def test_low_precision_scores_choose_the_float32_survivors(dtype, optim, score_lr):
    """Same survivors wherever float32's best candidate leads by more than the scores' rounding can move.

    Each step rounds a stored score by at most a unit in its last place (2^-7 of it in bfloat16), so after
    STEPS steps the two runs' scores differ by at most STEPS such units; a group whose float32 lead is
    more than twice that must keep the same candidate. Closer groups are ties within bfloat16 precision
    and may go either way (a tie removes the lower index).
    """
    ulp = 2.0 ** -7
    reference, ref_weights, ref_alive, _, _ = _train(torch.float32, optim, score_lr, seed=0)
    scores, weights, alive, optimizer, sp = _train(dtype, optim, score_lr, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(ref_weights, weights, strict=True))  # the scores never leaked
    assert all(s.dtype == dtype for s in sp.score_parameters())
    decided = total = learned = 0
    for s32, low, a32, a_low in zip(reference, scores, ref_alive, alive, strict=True):
        tol = STEPS * ulp * s32.abs().amax(1, keepdim=True)
        assert ((s32 - low).abs() <= tol).all()  # the low-precision scores learned what float32 learned
        assert (a32.sum(1) == 1).all() and (a_low.sum(1) == 1).all()
        top = s32.topk(2, dim=1).values
        clear = top[:, 0] - top[:, 1] > 2 * tol[:, 0]
        assert torch.equal(a32[clear], a_low[clear])
        learned += int((~a32[:, -1]).sum())  # survivors that are not index order's (the last candidate)
        decided, total = decided + int(clear.sum()), total + len(clear)
    assert decided > total // 2 and learned > total // 2  # the comparison covers most groups, learned ones


@pytest.mark.parametrize("dtype", LOW)
def test_gradual_paper_schedule_keeps_the_best_candidate_in_low_precision(dtype):
    """Frozen W, loss sum(c * W_eff): dL/dS_j = sum_{i in j} c_i W_i is constant, so every alive score moves
    by the same filter of its own gradient (SGD momentum and decay are linear) and the smallest-gradient
    candidate stays best through the whole gradual schedule. With candidate gradients at least 1/8 apart
    (c a permutation of 1/4, 1/2, 1, 2 in every group: all pair sums differ) every removal is clear in
    low precision too, and float32 and the low dtype keep exactly the analytic best."""
    gen = torch.Generator().manual_seed(0)
    c = torch.stack([torch.tensor([0.25, 0.5, 1.0, 2.0])[torch.randperm(4, generator=gen)] for _ in range(24)])
    c = from_groups(c, (6, 16))
    best = (to_groups(c * 0.5, 4) @ candidate_matrix(lbc.parse_pattern("2:4")).T).argmin(1)
    for score_dtype in (torch.float32, dtype):
        layer = nn.Linear(16, 6, bias=False)
        nn.init.constant_(layer.weight, 0.5)
        sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=3, train_weights=False,
                          score_dtype=NAMES[score_dtype])
        optimizer = build_optimizer("sgd", param_groups(layer, sp, 1e-4), lr=0.05, weight_decay=1e-4)
        state = layer.parametrizations.weight[0]
        removed = []
        for step in range(12):
            sp.update(step / 4)
            removed.append(sp.removed)
            if not state.scores.requires_grad:
                break
            optimizer.zero_grad()
            (c * layer.weight).sum().backward()
            optimizer.step()
        assert 0 < removed[4] < removed[-1] == 5  # gradual: some at epoch 1, the rest later
        assert state.scores.dtype == score_dtype
        assert torch.equal(state.alive.float().argmax(1), best), score_dtype


# --- what the dtype changes and what it does not ---------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_scores_gradients_and_optimizer_state_in_the_dtype_masks_stay_bool(dtype, optim):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))  # 512 and 256 scores: past 16
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_f=2, score_dtype=NAMES[dtype])
    groups = param_groups(model, sp, 1e-4)
    assert groups[-1]["params"] == sp.score_parameters() and groups[-1]["fused"] is False  # see LBC.param_groups
    groups[-1]["lr"] = 100.0 if optim == "sgd" else 0.3  # steps well above bfloat16's resolution at 1
    optimizer = build_optimizer(optim, groups, lr=0.1, weight_decay=1e-4)
    before = [s.detach().clone() for s in sp.score_parameters()]
    model(torch.randn(8, 64)).pow(2).mean().backward()
    for scores in sp.score_parameters():
        assert scores.dtype == dtype and scores.grad.dtype == dtype
    optimizer.step()
    for start, scores in zip(before, sp.score_parameters(), strict=True):
        moved = scores.detach() != start  # fused CPU SGD would move only the last numel % 16 (here: none)
        assert moved.float().mean() > 0.9, f"{int((~moved).sum())} of {moved.numel()} scores did not move"
        assert all(v.dtype == dtype for k, v in optimizer.state[scores].items() if k != "step")
    for module in sp.layers.values():
        state = module.parametrizations.weight[0]
        assert state.mask.dtype == torch.bool and state.alive.dtype == torch.bool
        assert module.parametrizations.weight.original.dtype == torch.float32  # weights keep their own dtype
    float32 = lbc.sparsify(nn.Linear(8, 4), method="lbc", exclude=[], t_f=2)
    assert "fused" not in float32.param_groups(0.0)[0]  # float32 scores keep build_optimizer's fused kernels


@pytest.mark.parametrize("removal", ["paper", "released"])
def test_the_prior_margin_in_low_precision(removal):
    layer = nn.Linear(8, 4)
    sp = lbc.sparsify(layer, method="lbc", exclude=[], t_f=2, prior="wanda", score_dtype="bfloat16",
                      score_init="released", removal=removal)
    a = candidate_matrix(sp.pattern).bool()
    pick = torch.arange(8) % 5  # never the last candidate, index order's survivor
    masks = {name: from_groups(a[pick], (4, 8)) for name in sp.layers}
    sp.start_from(masks)
    scores = sp.score_parameters()[0]
    expected = torch.full((8, 6), 1 / 3).to(torch.bfloat16)
    expected[torch.arange(8), pick] += 1.0
    assert scores.dtype == torch.bfloat16 and torch.equal(scores.detach(), expected)
    for epoch in (0, 1, 2):
        sp.update(epoch)
    assert all(torch.equal(sp.layer_mask(n), masks[n]) for n in sp.layers)


def test_the_attach_line_states_the_score_bytes(caplog):
    for name, size in (("float32", 4), ("bfloat16", 2)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=lbc_module.__name__):
            sp = lbc.sparsify(nn.Linear(2048, 4096), method="lbc", exclude=[], t_f=2, score_dtype=name)
        count = sum(s.numel() for s in sp.score_parameters())
        assert count == 2048 * 4096 * 6 // 4
        assert f"{count / 1e6:.2f}M scores (1.50 per weight), {count * size / 1e9:.2f} GB of {name} scores" in caplog.text
        del sp


def test_the_memory_check_counts_the_dtype(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    need_float32 = 2 * 64 * 64 // 4 * 6 * 4 * 4  # scores, gradients and two optimizer slots, 4 bytes each
    monkeypatch.setattr(lbc_module, "_free_memory", lambda device: need_float32 * 3 // 4)
    with pytest.raises(ConfigError, match=r"^sparsity.pattern=2:4: LBC needs 1.50 float32 scores per weight.*"
                                          r"sparsity.score_dtype=bfloat16") as err:
        lbc.sparsify(model, method="lbc", exclude=[], t_f=2)
    assert "\n" not in str(err.value)
    sp = lbc.sparsify(model, method="lbc", exclude=[], t_f=2, score_dtype="bfloat16")  # half: it fits
    assert sp.score_parameters()[0].dtype == torch.bfloat16


def test_score_dtype_is_checked():
    for bad in ("float64", "float16", "bf16"):
        with pytest.raises(ConfigError, match=rf"^sparsity.score_dtype='{bad}' is not allowed; choose from: float32, "
                                              r"bfloat16 \(not float16: AdamW's state underflows in it\)$"):
            lbc.sparsify(nn.Linear(8, 4), method="lbc", t_f=2, score_dtype=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_fused_kernels_update_low_precision_scores_on_cuda(dtype, optim):
    """On CUDA the scores keep build_optimizer's fused kernels: every score must move."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32)).cuda()
    sp = lbc.sparsify(model, method="lbc", exclude=[], t_f=2, score_dtype=NAMES[dtype])
    groups = param_groups(model, sp, 1e-4)
    assert "fused" not in groups[-1]
    optimizer = build_optimizer(optim, groups, lr=0.5, weight_decay=1e-4)
    assert optimizer.defaults["fused"]
    before = [s.detach().clone() for s in sp.score_parameters()]
    model(torch.randn(8, 64, device="cuda")).pow(2).mean().backward()
    optimizer.step()
    assert all((s.detach() != b).all() for s, b in zip(sp.score_parameters(), before, strict=True))

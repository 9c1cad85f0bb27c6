"""Table 6 selection criteria on LBC's schedule, and every method on real torchvision/timm models."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import lbc
from lbc.errors import ConfigError
from lbc.sparsity.lbc import CRITERIA
from lbc.sparsity.nm import NMPattern, is_nm, to_groups


def _one_group(criterion):
    layer = nn.Linear(4, 1, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=1, criterion=criterion)
    return layer, sp, layer.parametrizations.weight[0]


def test_score_inverse_keeps_the_opposite_of_score():
    kept = {}
    for criterion in ("score", "score_inverse"):
        _, sp, state = _one_group(criterion)
        with torch.no_grad():
            state.scores.copy_(torch.tensor([[5.0, 0.0, 3.0, 1.0, 4.0, 2.0]]))
        sp.update(1)
        kept[criterion] = state.alive.tolist()
    assert kept["score"] == [[True, False, False, False, False, False]]  # highest score: (0, 1)
    assert kept["score_inverse"] == [[False, True, False, False, False, False]]  # lowest score: (0, 2)


def test_magnitude_keeps_the_largest_pair():
    layer, sp, state = _one_group("magnitude")
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[0.1, -3.0, 0.2, 2.0]]))
    assert not state.scores.requires_grad  # magnitude never learns the scores
    sp.update(1)
    assert state.mask.tolist() == [[False, True, False, True]]


def test_gradient_accumulates_between_removals_and_keeps_the_largest_w_times_g():
    layer = nn.Linear(4, 1, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=3, criterion="gradient")
    state = layer.parametrizations.weight[0]
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(torch.tensor([[1.0, -1.0, 2.0, 1.0]]))
    c1, c2 = torch.tensor([[0.0, 5.0, -1.0, 0.1]]), torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    for c in (c1, c2):  # two steps: |W * g| summed over them
        (c * layer.weight).sum().backward()
    expected = (layer.parametrizations.weight.original.detach() * c1).abs()
    expected += (layer.parametrizations.weight.original.detach() * c2).abs()
    torch.testing.assert_close(state.grad_accum, expected)  # [0, 5, 4, 0.1]
    sp.update(3)  # all 5 removed at once: the pair (1, 2) has the largest accumulated |W * g|
    assert state.mask.tolist() == [[False, True, True, False]]
    assert (state.grad_accum == 0).all()  # reset after the removal
    (c1 * layer.weight).sum().backward()
    assert (state.grad_accum == 0).all()  # final: no more accumulation


def test_gradient_buffer_resets_at_every_removal():
    layer = nn.Linear(8, 3, bias=False)
    sp = lbc.sparsify(layer, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=4, criterion="gradient")
    state = layer.parametrizations.weight[0]
    layer(torch.randn(2, 8)).sum().backward()
    assert state.grad_accum.abs().sum() > 0
    sp.update(1)
    assert 0 < sp.removed < 5 and (state.grad_accum == 0).all()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_criteria_give_valid_and_different_nm_masks_on_the_same_data():
    masks = {}
    for criterion in CRITERIA:
        torch.manual_seed(0)
        model = Net()
        sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=[], t_i=0, t_f=2, criterion=criterion)
        groups = [{"params": [p for p in model.parameters() if all(p is not s for s in sp.score_parameters())]}]
        opt = torch.optim.SGD(groups + sp.param_groups(0.0), lr=0.5, momentum=0.9)
        gen = torch.Generator().manual_seed(1)
        target = torch.randn(8, 8, generator=gen)
        for step in range(12):
            sp.update(step / 4)
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(8, 8, 4, 4, generator=gen)), target).backward()
            opt.step()
        sp.update(3)
        assert sp.is_exact_nm(), criterion
        for name, mask in sp.masks().items():
            assert (to_groups(mask, 4).sum(1) == 2).all(), (criterion, name)  # exactly N per group
        assert is_nm(model.conv.weight, NMPattern(2, 4)) and is_nm(model.fc.weight, NMPattern(2, 4))
        masks[criterion] = torch.cat([m.flatten() for m in sp.masks().values()])
    differ = {(a, b) for a in CRITERIA for b in CRITERIA if a < b and not torch.equal(masks[a], masks[b])}
    assert differ, "every criterion chose the same mask"
    assert not torch.equal(masks["score"], masks["score_inverse"])
    assert not torch.equal(masks["magnitude"], masks["gradient"])


def test_unknown_criterion_is_a_config_error():
    with pytest.raises(ConfigError, match="sparsity.criterion"):
        lbc.sparsify(Net(), method="lbc", t_f=2, criterion="random")


def _resnet18():
    return torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)


def _deit_small():
    # DeiT-small's layers and names (width 384, 6 heads, patch 16), at 32 px and 2 of its 12 blocks:
    # every kind of layer is there and the CPU test stays fast.
    model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    return model, (2, 3, 32, 32)


OPTIONS = {
    "lbc": {"t_i": 0, "t_f": 1},
    "srste": {},
    "asp": {"dense_epochs": 1, "finetune_epochs": 1},
}


@pytest.mark.parametrize("build", [_resnet18, _deit_small], ids=["resnet18", "deit_small"])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_every_method_ends_exactly_nm_on_real_models(build, method):
    torch.manual_seed(0)
    model, shape = build()
    sp = lbc.sparsify(model, method=method, pattern="2:4", **OPTIONS[method])
    assert "conv1" not in sp.layers and "fc" not in sp.layers  # resnet: stem and classifier dense
    assert "patch_embed.proj" not in sp.layers and "head" not in sp.layers  # deit: the same
    assert len(sp.layers) >= 8
    scores = {id(s) for s in sp.score_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in scores] + sp.score_parameters(), lr=0.01,
                          momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(2):
        sp.update(epoch)
        opt.zero_grad()
        model(torch.randn(shape, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
    sp.update(2)
    sp.finalize()
    assert sp.is_exact_nm() and sp.report()["scalars"]["exact_nm"] == 1.0
    state = model.state_dict()
    for name in sp.layers:
        assert is_nm(model.get_submodule(name).weight, NMPattern(2, 4)), name
        assert f"{name}.weight" in state

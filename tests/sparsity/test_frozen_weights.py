"""LBC with ``train_weights=false`` (MaskLLM's setting): only the scores learn, every weight stays bit-identical."""

import logging

import pytest
import torch
from torch import nn

import lbc
from lbc.engine.optim import build_optimizer, param_groups
from lbc.errors import ConfigError
from lbc.sparsity import lbc as lbc_module
from lbc.sparsity.nm import to_groups


class TinyLM(nn.Module):
    """Embeddings, a norm, biased Linears (masked) and a tied head: every kind of parameter an LM has."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.down = nn.Linear(32, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight  # tied, as many LMs are

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.norm(self.up(self.embed(ids))))))


STEPS_PER_EPOCH = 4


def _attach(**options):
    torch.manual_seed(0)
    model = TinyLM()
    sp = lbc.sparsify(model, method="lbc", pattern="2:4", exclude=["head"], t_i=0, t_f=4, train_weights=False,
                      **options)
    return model, sp


def _weights(model, sp):
    own = {id(s) for s in sp.score_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in own}


def test_attach_freezes_every_parameter_but_the_scores(caplog):
    with caplog.at_level(logging.INFO, logger=lbc_module.__name__):
        model, sp = _attach()
    own = {id(s) for s in sp.score_parameters()}
    assert set(sp.layers) == {"up", "down"} and len(own) == 2
    frozen = [p for p in model.parameters() if id(p) not in own]
    assert frozen and not any(p.requires_grad for p in frozen)  # embeddings, norm, biases, stored weights
    assert all(s.requires_grad for s in sp.score_parameters())
    count = sum(p.numel() for p in frozen)  # model.parameters() counts the tied embedding once
    assert count == 32 * 16 + (16 * 32 + 32) + 2 * 32 + (32 * 16 + 16)
    assert f"lbc: weights frozen (train_weights=false): only the scores learn, {count / 1e6:.2f}M params frozen" \
        in caplog.text
    groups = param_groups(model, sp, 0.1)
    assert [p for g in groups for p in g["params"]] == sp.score_parameters()  # the optimizer holds the scores only

    default = lbc.sparsify(TinyLM(), method="lbc", exclude=["head"], t_f=2)  # train_weights=true: nothing frozen
    assert all(p.requires_grad for p in default.model.parameters())


def test_no_weight_gradient_is_computed_and_the_scores_get_theirs(monkeypatch):
    model, sp = _attach()
    returned = []
    backward = lbc_module._LBCMask.backward

    def spy(ctx, grad_out):
        grads = backward(ctx, grad_out)
        returned.append(grads)
        return grads

    monkeypatch.setattr(lbc_module._LBCMask, "backward", staticmethod(spy))
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert len(returned) == 2  # one per masked layer
    assert all(grads[0] is None for grads in returned)  # the weight gradient: never computed
    assert all(grads[1] is not None and grads[1].abs().sum() > 0 for grads in returned)
    assert all(p.grad is None for n, p in model.named_parameters() if "scores" not in n)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sp.score_parameters())  # the first layer too


@pytest.mark.parametrize("optim, extra", [("sgd", {"momentum": 0.9}), ("adamw", {})])
def test_weights_bit_identical_through_training_scores_and_masks_change(optim, extra, caplog):
    model, sp = _attach()
    dense = _weights(model, sp)
    scores = [s.detach().clone() for s in sp.score_parameters()]
    optimizer = build_optimizer(optim, param_groups(model, sp, 0.1), lr=0.05, weight_decay=0.1, **extra)
    gen = torch.Generator().manual_seed(1)
    masks_seen = []
    with caplog.at_level(logging.WARNING, logger=lbc_module.__name__):
        for step in range(4 * STEPS_PER_EPOCH):
            sp.update(step / STEPS_PER_EPOCH)
            if not any(p.requires_grad for p in model.parameters()):
                break  # one candidate left (epoch 2 of t_f=4, Eq. 6's ceil): the scores froze, nothing trains
            masks_seen.append([sp.layer_mask(n).clone() for n in sp.layers])
            ids = torch.randint(0, 32, (8, 8), generator=gen)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            optimizer.step()
            for name, value in _weights(model, sp).items():
                assert torch.equal(value, dense[name]), (step, name)  # every weight, every step
    assert len(masks_seen) == 2 * STEPS_PER_EPOCH and sp.removed == 5 and sp.is_exact_nm()
    assert "nothing trains from epoch 2 on (t_f=4); stop training there" in caplog.text
    assert all(not torch.equal(a, s.detach()) for a, s in zip(scores, sp.score_parameters(), strict=True))
    first, middle = masks_seen[0], masks_seen[STEPS_PER_EPOCH]  # before and after the first removal (epoch 1)
    assert all(m.all() for m in first) and not all(m.all() for m in middle)
    alive = [m.parametrizations.weight[0].alive for m in sp.layers.values()]
    assert any((~a[:, -1]).any() for a in alive)  # learned: not index order's survivor (the last) everywhere
    for name in sp.layers:
        kept = to_groups(sp.layer_mask(name), 4).sum(1)
        assert (kept == 2).all()
        effective = sp.layers[name].weight  # B * W of the untouched dense weight
        assert torch.equal(effective, dense[f"{name}.parametrizations.weight.original"] * sp.layer_mask(name))


@pytest.mark.parametrize("criterion", ["magnitude", "gradient"])
def test_frozen_weights_need_a_learned_criterion(criterion):
    with pytest.raises(ConfigError, match=rf"^sparsity.train_weights=False is not allowed; .*criterion={criterion} learns none"):
        lbc.sparsify(TinyLM(), method="lbc", exclude=["head"], t_f=2, train_weights=False, criterion=criterion)

"""ASP: dense phase, one-shot magnitude prune (== torch.ao WeightNormSparsifier), masked fine-tuning."""

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier

import lbc
from lbc.errors import ConfigError
from lbc.io import load_model_weights
from lbc.sparsity.nm import NMPattern, is_nm, topn_mask


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "4:8", "1:16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_mask_equals_weight_norm_sparsifier(pattern, seed):
    p = lbc.parse_pattern(pattern)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 24), nn.Linear(24 * 2, 8))
    weights = [layer.weight.detach().clone() for layer in model]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, p.m), zeros_per_block=p.m - p.n)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    reference = model[0].parametrizations.weight[0].mask.bool()
    assert torch.equal(topn_mask(weights[0], p), reference)

    # and the method's prune gives the same mask
    layer = nn.Linear(32, 24)
    with torch.no_grad():
        layer.weight.copy_(weights[0])
    sp = lbc.sparsify(layer, method="asp", pattern=pattern, exclude=[], dense_epochs=0)
    sp.update(0)
    assert torch.equal(layer.parametrizations.weight[0].mask, reference)
    assert sp.is_exact_nm()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _steps(model, opt, count, seed, sp=None, epoch=0.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        if sp is not None:
            sp.update(epoch)
        opt.zero_grad()
        model(torch.randn(4, 8, 5, 5, generator=gen)).pow(2).mean().backward()
        opt.step()


def _pruned(layer):
    return ~layer.parametrizations.weight[0].mask


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_pruned_weights_stay_zero_through_momentum_and_weight_decay(optim):
    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    _steps(model, opt, 10, seed=0, sp=sp, epoch=0.5)  # dense phase: builds momentum on every weight
    assert not sp.pruned and sp.report()["scalars"]["exact_nm"] == 0.0
    sp.update(1.0)
    assert sp.pruned and sp.is_exact_nm()
    mask_before = {n: m.clone() for n, m in sp.masks().items()}
    for layer in (model.conv, model.fc):
        assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()  # stored zeroed at the prune
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(4, 8, 5, 5, generator=gen)).pow(2).mean().backward()
        for layer in (model.conv, model.fc):
            assert (layer.parametrizations.weight.original.grad[_pruned(layer)] == 0).all()  # masked gradient
        opt.step()
        for layer in (model.conv, model.fc):
            assert (layer.weight[_pruned(layer)] == 0).all()  # effective weight: exactly zero, every step
        sp.update(1.5)  # the trainer's per-step call re-zeroes the stored weights
        for layer in (model.conv, model.fc):
            assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()
    assert sp.masks().keys() == mask_before.keys()
    assert all(torch.equal(sp.masks()[n], m) for n, m in mask_before.items())  # mask fixed
    sp.finalize()
    assert is_nm(model.state_dict()["conv.weight"], NMPattern(2, 4))  # checkpoints hold zeros too
    sp.detach()
    assert is_nm(model.conv.weight, NMPattern(2, 4)) and is_nm(model.fc.weight, NMPattern(2, 4))


def test_dense_epochs_0_is_dense_until_update_0_then_exactly_nm():
    torch.manual_seed(0)
    model = Net()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0, finetune_epochs=1)
    assert not sp.pruned and sp.masks()["conv.weight"].all() and not sp.is_exact_nm()
    assert torch.equal(model.conv.weight, dense["conv.weight"])  # the constructor prunes nothing
    sp.update(0)
    assert sp.pruned and sp.is_exact_nm() and sp.report()["scalars"]["exact_nm"] == 1.0
    for layer in (model.conv, model.fc):
        kept = layer.parametrizations.weight[0].mask
        assert torch.equal(kept, topn_mask(dense[f"{'conv' if layer is model.conv else 'fc'}.weight"], NMPattern(2, 4)))
        assert (layer.parametrizations.weight.original[~kept] == 0).all()
    assert sp.state_dict()["cost_timeline"] == [(0.0, 0.5)]  # sparse from the first step on


def test_prune_at_update_0_keeps_stored_zeros_with_no_further_update_call():
    """No optimizer state exists before the first step, so nothing can move a stored zero."""
    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0, finetune_epochs=1)
    sp.update(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _steps(model, opt, 30, seed=0)
    for layer in (model.conv, model.fc):
        assert _pruned(layer).sum() == layer.weight.numel() // 2
        assert (layer.parametrizations.weight.original[_pruned(layer)] == 0).all()
        assert (layer.weight[_pruned(layer)] == 0).all()


def test_weights_loaded_after_attaching_are_the_ones_pruned():
    """MMDetection loads a checkpoint after the model (and its method) are built: the prune must wait."""
    torch.manual_seed(0)
    trained = Net()
    torch.manual_seed(1)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0)
    # as mmengine's load_checkpoint does (strict=False): plain keys reach the dense weights
    missing, unexpected = model.load_state_dict(trained.state_dict(), strict=False)
    assert all(k.endswith(".mask") for k in missing) and not unexpected
    sp.update(0)
    expected = trained.conv.weight.detach() * topn_mask(trained.conv.weight.detach(), NMPattern(2, 4))
    assert torch.equal(model.conv.weight, expected)


def test_update_prunes_once_and_records_the_cost():
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=2, finetune_epochs=2)
    assert sp.milestones() == {"dense": 2}
    assert sp.phases() == [("dense", 2), ("finetune", 2)]
    sp.update(1.9)
    assert not sp.pruned
    sp.update(2.0)
    mask = model.conv.parametrizations.weight[0].mask.clone()
    with torch.no_grad():
        model.conv.parametrizations.weight.original.mul_(torch.rand_like(mask, dtype=torch.float))
    sp.update(3.0)  # idempotent: no second prune on changed weights
    assert torch.equal(model.conv.parametrizations.weight[0].mask, mask)
    sp.update(4.0)
    assert sp.train_flops_ratio() == pytest.approx((2 * 1.0 + 2 * 0.5) / 4)
    state = sp.state_dict()
    assert state["pruned"] is True


def test_finetune_epochs_default_none_is_the_rest_of_the_schedule():
    sp = lbc.sparsify(Net(), method="asp", exclude=[], dense_epochs=3)
    assert sp.finetune_epochs is None
    assert sp.phases() == [("dense", 3), ("finetune", None)]
    assert lbc.sparsify(Net(), method="asp", exclude=[], dense_epochs=0).phases() == [("finetune", None)]
    with pytest.raises(ConfigError, match="sparsity.finetune_epochs=-1"):
        lbc.sparsify(Net(), method="asp", finetune_epochs=-1)
    with pytest.raises(ConfigError, match="sparsity.dense_epochs=1.5"):
        lbc.sparsify(Net(), method="asp", dense_epochs=1.5)


def test_init_from_is_gone():
    with pytest.raises(ConfigError, match="sparsity.init_from is not an option of method 'asp'"):
        lbc.sparsify(Net(), method="asp", init_from="dense.pt")


def test_start_from_a_dense_checkpoint_load_then_sparsify(tmp_path):
    """The hand-off: lbc.io.load_model_weights, then ASP with dense_epochs=0 prunes those weights."""
    torch.manual_seed(0)
    dense = Net()
    torch.save({"model": dense.state_dict(), "epoch": 3}, tmp_path / "dense.pt")
    torch.manual_seed(1)
    model = Net()
    load_model_weights(model, tmp_path / "dense.pt", "trainer.init_from")
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=0, finetune_epochs=4)
    sp.update(0)
    assert sp.pruned and sp.is_exact_nm()
    assert sp.milestones() == {} and sp.phases() == [("finetune", 4)]
    expected = dense.conv.weight.detach() * topn_mask(dense.conv.weight.detach(), NMPattern(2, 4))
    assert torch.equal(model.conv.weight, expected)


def test_load_model_weights_formats_and_one_line_errors(tmp_path):
    torch.manual_seed(0)
    dense = Net()
    # an earlier sparse run's checkpoint: DDP prefixes and the method's own tensors (masks) are dropped
    sparse = Net()
    sp = lbc.sparsify(sparse, method="asp", exclude=[], dense_epochs=0)
    sp.update(0)
    torch.save({"model": {f"module.{k}": v for k, v in sparse.state_dict().items()}}, tmp_path / "ddp.pt")
    model = Net()
    load_model_weights(model, tmp_path / "ddp.pt", "trainer.init_from")
    assert torch.equal(model.conv.weight, sparse.conv.weight.detach())
    torch.save(dense.state_dict(), tmp_path / "plain.pt")  # a plain state dict works too
    load_model_weights(model, str(tmp_path / "plain.pt"), "trainer.init_from")
    assert torch.equal(model.fc.weight, dense.fc.weight)
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "shape.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    for name, message in (("missing.pt", "no such checkpoint file"), ("broken.pt", "not a readable checkpoint"),
                          ("list.pt", "holds no state dict"), ("shape.pt", "does not fit the model")):
        with pytest.raises(ConfigError, match=f"^my.key='.*{name}'.*{message}") as err:
            load_model_weights(Net(), tmp_path / name, "my.key")
        assert "\n" not in str(err.value)


def _apex_net(hidden=16):
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16, hidden), nn.Linear(hidden, 16),
                         nn.Linear(16, 10))


def test_apex_defaults_as_options():
    sp = lbc.sparsify(_apex_net(), method="asp", dense_epochs=0)
    assert set(sp.layers) == {"2", "3"}  # stem (3 inputs) and classifier dense by default
    sp = lbc.sparsify(_apex_net(), method="asp", dense_epochs=0, prune_classifier=True)
    assert set(sp.layers) == {"2", "3", "4"}
    sp = lbc.sparsify(_apex_net(hidden=12), method="asp", dense_epochs=0, apex_dims=True)
    assert set(sp.layers) == set()  # "2": out 12 not a multiple of 8; "3": in 12 not a multiple of 16
    assert "apex_dims" in sp.dense_reasons["2"] and "apex_dims" in sp.dense_reasons["3"]
    sp = lbc.sparsify(_apex_net(hidden=32), method="asp", dense_epochs=0, apex_dims=True, prune_classifier=True)
    assert set(sp.layers) == {"2", "3"}  # the classifier's 10 outputs are not a multiple of 8
    sp.update(0)
    assert sp.is_exact_nm() and "4" in sp.dense_reasons


def test_resume_after_the_prune_keeps_the_mask(tmp_path):
    import copy

    torch.manual_seed(0)
    model = Net()
    sp = lbc.sparsify(model, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    sp.update(1)
    saved = copy.deepcopy((model.state_dict(), sp.state_dict()))
    torch.manual_seed(1)
    clone = Net()
    sp2 = lbc.sparsify(clone, method="asp", pattern="2:4", exclude=[], dense_epochs=1, finetune_epochs=1)
    clone.load_state_dict(saved[0])
    sp2.load_state_dict(saved[1])
    assert sp2.pruned and sp2.is_exact_nm()
    assert all(torch.equal(sp.masks()[k], v) for k, v in sp2.masks().items())
    sp2.update(1.5)  # no second prune
    assert all(torch.equal(sp.masks()[k], v) for k, v in sp2.masks().items())


# --- the config's default dense phase: 3/5 of schedule.epochs, rounded down --------------------------
@pytest.mark.parametrize("overrides, epochs, dense", [
    (["schedule.epochs=6"], 6, 3),
    (["schedule.epochs=12"], 12, 7),
    (["schedule.epochs=120"], 120, 72),
    (["schedule.epochs=200"], 200, 120),  # the paper's 120 dense + 80 fine-tuning
    (["task=detection"], 6, 3),  # the shapes set's 6-epoch 1x schedule
    (["task=detection", "schedule.epochs=12"], 12, 7),  # mmdet's 1x: 12 epochs
])
def test_default_dense_epochs_follow_the_schedule_rounded_down(overrides, epochs, dense):
    from lbc.config import validate
    from lbc.engine.optim import phase_lengths
    from tests.helpers import compose_config

    typed = validate(compose_config(["sparsity=asp", *overrides]))
    options, schedule = typed["sparsity"], typed["schedule"]
    assert schedule.epochs == epochs and options.dense_epochs == dense and type(options.dense_epochs) is int
    sp = lbc.sparsify(Net(), **{**vars(options), "exclude": []})
    assert phase_lengths(sp.phases(), epochs) == [dense, epochs - dense]


def test_default_dense_epochs_is_accepted_for_every_schedule_length():
    """floor(3/5 * epochs) is whole and below the epochs, so some fine-tuning is always left (round half up
    would give 1 of 1 epoch: no fine-tuning, refused)."""
    import yaml
    from omegaconf import OmegaConf

    import lbc.config  # noqa: F401  (registers the resolvers)
    from lbc.engine.optim import phase_lengths
    from tests.helpers import CONFIGS

    expression = yaml.safe_load((CONFIGS / "sparsity" / "asp.yaml").read_text())["dense_epochs"]
    assert expression.startswith("${floor:")
    for epochs in range(1, 401):
        dense = OmegaConf.create({"schedule": {"epochs": epochs}, "dense_epochs": expression}).dense_epochs
        assert type(dense) is int and dense == 3 * epochs // 5, epochs
        phase_lengths([("dense", dense), ("finetune", None)], epochs)  # raises if nothing is left to fine-tune

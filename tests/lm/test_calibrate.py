"""lbc.lm.calibrate.one_shot on tiny random LLaMA and GPT-2 models: block-sequential Wanda and SparseGPT."""

import pytest
import torch
from torch import nn

import lbc
import lbc.sparsity.oneshot  # noqa: F401  (registers the methods until lbc.sparsity imports it)
from lbc.errors import ConfigError
from lbc.lm.calibrate import one_shot
from lbc.lm.model import decoder_blocks, linearize_conv1d
from lbc.sparsity.base import stored_weight
from lbc.sparsity.nm import NMPattern, is_exactly_nm, topn_mask
from lbc.sparsity.oneshot import sparsegpt_prune, wanda_mask

transformers = pytest.importorskip("transformers")

PATTERN = NMPattern(2, 4)


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()


GPT2_CONFIG = transformers.GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=256, eos_token_id=256)


def tiny_gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(GPT2_CONFIG).eval()  # eval: no dropout
    linearize_conv1d(model)
    return model


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def batches(count=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (2, 16), generator=gen) for _ in range(count)]


def _attach(build, method, exclude=("lm_head",)):
    model = build()
    return model, lbc.sparsify(model, method, exclude=list(exclude))


def _input_sums_of_squares(model, names):
    """Sum over all calibration tokens of x_j^2 per input feature of each layer, from our own hooks."""
    sums = {}

    def hook(name):
        def add(_module, args, _out):
            sums[name] = sums.get(name, 0) + args[0].detach().pow(2).sum(dim=(0, 1))
        return add

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for ids in batches():
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


def _block_layers(sp, model, index):
    block = decoder_blocks(model)[index]
    own = {id(m) for m in block.modules()}
    return [n for n, m in sp.layers.items() if id(m) in own]


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_masks_are_exactly_nm_and_the_model_is_left_as_it_was(arch, criterion):
    model, sp = _attach(MODELS[arch], criterion)  # lbc.sparsify(model, criterion, exclude=["lm_head"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks, weights = one_shot(model, sp, criterion, batches(), blocksize=16)
    assert set(masks) == set(sp.layers) and len(masks) == (14 if arch == "llama" else 8)
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == stored_weight(sp.layers[name]).shape
        assert is_exactly_nm(mask, PATTERN), name
    if criterion == "sparsegpt":
        assert set(weights) == set(masks)
        assert all(bool((weights[n][~masks[n]] == 0).all()) for n in masks)
    else:
        assert weights is None
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.training for m in model.modules())
    sp.start_from(masks, weights)  # what the LM runner does next
    sp.finalize()
    for name, module in sp.layers.items():
        expected = weights[name] if weights else before[f"{name}.weight"] * masks[name]
        assert torch.equal(stored_weight(module), expected)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_wanda_is_block_sequential(arch):
    """Block 0's masks come from the dense inputs, block 1's from the inputs that the *pruned* block 0 gives."""
    model, sp = _attach(MODELS[arch], "wanda")
    masks, _ = one_shot(model, sp, "wanda", batches())
    first, second = _block_layers(sp, model, 0), _block_layers(sp, model, 1)
    sums = _input_sums_of_squares(model, first)
    for name in first:
        assert torch.equal(masks[name], wanda_mask(stored_weight(sp.layers[name]), sums[name].sqrt(), PATTERN)), name
    with torch.no_grad():
        for name in first:
            stored_weight(sp.layers[name]).mul_(masks[name])
    sums = _input_sums_of_squares(model, second)
    for name in second:
        assert torch.equal(masks[name], wanda_mask(stored_weight(sp.layers[name]), sums[name].sqrt(), PATTERN)), name


def test_sparsegpt_is_block_sequential_on_the_reconstructed_block():
    """Block 1 is pruned from the inputs that block 0 gives with its SparseGPT weights (not merely masked)."""
    model, sp = _attach(lambda: tiny_llama().double(), "sparsegpt")
    masks, weights = one_shot(model, sp, "sparsegpt", batches(), blocksize=16)
    first, second = _block_layers(sp, model, 0), _block_layers(sp, model, 1)
    inputs = {}
    handles = [sp.layers[n].register_forward_hook(lambda _m, a, _o, n=n: inputs.setdefault(n, []).append(a[0]))
               for n in second]
    with torch.no_grad():
        for name in first:
            stored_weight(sp.layers[name]).copy_(weights[name])
        for ids in batches():
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for name in second:
        x = torch.cat(inputs[name]).flatten(0, 1)
        weight, mask = sparsegpt_prune(stored_weight(sp.layers[name]), x.T @ x, PATTERN, blocksize=16)
        assert torch.equal(masks[name], mask), name
        torch.testing.assert_close(weights[name], weight)


def test_a_layer_after_the_blocks_calibrates_on_the_pruned_model():
    model, sp = _attach(tiny_llama, "wanda", exclude=())
    assert "lm_head" in sp.layers
    masks, _ = one_shot(model, sp, "wanda", batches())
    with torch.no_grad():
        for name in sp.layers:
            if name != "lm_head":
                stored_weight(sp.layers[name]).mul_(masks[name])
    sums = _input_sums_of_squares(model, ["lm_head"])
    assert torch.equal(masks["lm_head"], wanda_mask(stored_weight(model.lm_head), sums["lm_head"].sqrt(), PATTERN))


def test_mapping_batches_give_the_same_masks():
    model, sp = _attach(tiny_gpt2, "wanda")
    as_ids, _ = one_shot(model, sp, "wanda", batches())
    mapped = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in batches()]
    as_maps, _ = one_shot(model, sp, "wanda", mapped)
    assert all(torch.equal(as_maps[n], as_ids[n]) for n in as_ids)


def test_a_model_without_blocks_gets_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = lbc.sparsify(model, "wanda", exclude=[])
    x = [torch.randn(32, 8) for _ in range(2)]
    masks, _ = one_shot(model, sp, "wanda", x)
    norms = torch.cat(x).norm(dim=0)
    assert torch.equal(masks["0"], wanda_mask(model[0].weight, norms, PATTERN))
    hidden = torch.relu(model[0](torch.cat(x))).norm(dim=0)  # from the dense first layer: not sequential
    assert torch.equal(masks["2"], wanda_mask(model[2].weight, hidden, PATTERN))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return x + torch.tanh(self.fc(x)) * scale


class Toy(nn.Module):
    """Decoder blocks (named in _no_split_modules, called with a keyword) between a layer before and one after."""

    _no_split_modules = ["Block"]

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.blocks, self.head = nn.Linear(8, 8), nn.ModuleList([Block(), Block()]), nn.Linear(8, 4)

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, scale=0.5)
        return self.head(x)


def test_layers_before_inside_and_after_the_blocks_are_pruned_in_order():
    torch.manual_seed(0)
    model = Toy()
    sp = lbc.sparsify(model, "wanda", exclude=[])
    x = [torch.randn(3, 5, 8) for _ in range(2)]
    masks, _ = one_shot(model, sp, "wanda", x, progress=True)
    assert set(masks) == {"proj_in", "blocks.0.fc", "blocks.1.fc", "head"}

    def pruned(name, h):  # the expected mask of layer `name` from its inputs h, and its pruned output
        layer = model.get_submodule(name)
        mask = wanda_mask(stored_weight(layer), h.flatten(0, 1).norm(dim=0), PATTERN)
        assert torch.equal(masks[name], mask), name
        return nn.functional.linear(h, stored_weight(layer) * mask, layer.bias)

    with torch.no_grad():
        h = pruned("proj_in", torch.cat(x))
        for i in range(2):
            h = h + torch.tanh(pruned(f"blocks.{i}.fc", h)) * 0.5
        pruned("head", h)


def _output_distance(model, sp, masks, weights):
    """Distance of the pruned model's logits to the dense model's on the calibration batches."""
    with torch.no_grad():
        dense = [model(input_ids=ids).logits for ids in batches()]
        saved = {n: stored_weight(m).clone() for n, m in sp.layers.items()}
        for name, module in sp.layers.items():
            stored_weight(module).copy_(weights[name] if weights else saved[name] * masks[name])
        pruned = [model(input_ids=ids).logits for ids in batches()]
        for name, module in sp.layers.items():
            stored_weight(module).copy_(saved[name])
    return float(sum((a - b).norm() ** 2 for a, b in zip(dense, pruned, strict=True)) ** 0.5)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_sparsegpt_reconstructs_better_than_magnitude(arch):
    model, sp = _attach(MODELS[arch], "sparsegpt")
    sparsegpt = one_shot(model, sp, "sparsegpt", batches(), blocksize=16)
    magnitude = one_shot(model, sp, "magnitude", None)
    assert _output_distance(model, sp, *sparsegpt) < _output_distance(model, sp, *magnitude)
    first = _block_layers(sp, model, 0)  # and layer by layer on block 0, whose inputs are the dense model's
    inputs = {}
    handles = [sp.layers[n].register_forward_hook(lambda _m, a, _o, n=n: inputs.setdefault(n, []).append(a[0]))
               for n in first]
    with torch.no_grad():
        for ids in batches():
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    for name in first:
        x = torch.cat(inputs[name]).flatten(0, 1)
        weight = stored_weight(sp.layers[name])
        error = (x @ weight.T - x @ sparsegpt[1][name].T).norm()
        assert error < (x @ weight.T - x @ (weight * magnitude[0][name]).T).norm(), name


def test_magnitude_needs_no_batches():
    model, sp = _attach(tiny_llama, "magnitude")
    masks, weights = one_shot(model, sp, "magnitude", None)
    assert weights is None
    assert all(torch.equal(masks[n], topn_mask(stored_weight(m), PATTERN)) for n, m in sp.layers.items())


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("given", [None, []])
def test_calibrated_criteria_need_batches(criterion, given):
    model, sp = _attach(tiny_llama, criterion)
    with pytest.raises(ConfigError) as err:
        one_shot(model, sp, criterion, given)
    message = str(err.value)
    assert f"sparsity.prior={criterion}" in message and "data.calibration_sequences" in message and "\n" not in message


def test_unknown_criterion_and_bad_sparsegpt_options():
    model, sp = _attach(tiny_llama, "wanda")
    with pytest.raises(ConfigError, match=r"^sparsity.prior='obs' is not allowed; choose from: magnitude, wanda"):
        one_shot(model, sp, "obs", batches())
    with pytest.raises(ConfigError, match=r"^sparsity.blocksize=6 is not allowed"):
        one_shot(model, sp, "sparsegpt", batches(), blocksize=6)
    with pytest.raises(ConfigError, match=r"^sparsity.damp=0 is not allowed"):
        one_shot(model, sp, "sparsegpt", batches(), damp=0)

"""lbc/lm/evaluate.py: sliding-window perplexity against independent references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lbc.errors import ConfigError, DataError
from lbc.lm.evaluate import perplexity
from lbc.run import distributed

V = 257


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model runs fastest on one thread (and the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


class Bigram(nn.Module):
    """Logits from the current token only: every token's NLL is known without any window."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(3)))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])

    def nll(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log p(ids[t] | ids[t-1]) for each t in ``targets``."""
        logp = torch.log_softmax(self.table[ids[targets - 1]].double(), dim=-1)
        return -logp[torch.arange(len(targets)), ids[targets]]


class Oracle(nn.Module):
    """All probability (up to e^-60) on the next token of the sequence next = (3 * token + 1) % V."""

    def forward(self, input_ids):
        return SimpleNamespace(logits=60.0 * F.one_hot((3 * input_ids + 1) % V, V).float())


class Uniform(nn.Module):
    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V))


@pytest.mark.parametrize("n", [70, 65])
def test_disjoint_windows_equal_a_loop_with_cross_entropy(llama, n):
    ids, seq_len = random_ids(n), 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, n, seq_len):
            w = ids[b:b + seq_len]
            if len(w) > 1:
                logits = llama(input_ids=w[None]).logits[0]
                nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
                count += len(w) - 1
    out = perplexity(llama, ids, seq_len=seq_len, batch_size=3)
    assert out["val_tokens"] == count
    assert out["val_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert out["tokens_per_s"] > 0


@pytest.mark.parametrize("stride", [5, 11])
def test_sliding_windows_equal_a_per_token_reference(llama, stride):
    """Token t is predicted from ids[b:t], b the begin of the first window k * stride that holds t after its first token."""
    ids, seq_len = random_ids(35, seed=2), 16
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            b = next(k * stride for k in range(len(ids)) if k * stride < t < k * stride + seq_len)
            logits = llama(input_ids=ids[None, b:t]).logits[0, -1]
            nll -= torch.log_softmax(logits.double(), dim=-1)[ids[t]].item()
    out = perplexity(llama, ids, seq_len=seq_len, stride=stride, batch_size=2)
    assert out["val_tokens"] == len(ids) - 1
    assert out["val_loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


@pytest.mark.parametrize("n", [2, 10, 16, 17, 45, 64])
def test_every_token_after_the_first_is_scored_once_for_any_overlapping_stride(n):
    model, ids, seq_len = Bigram(), random_ids(n, seed=n), 16
    for stride in range(1, seq_len):
        out = perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=4)
        assert out["val_tokens"] == n - 1
        expected = model.nll(ids, torch.arange(1, n)).mean().item()
        assert out["val_loss"] == pytest.approx(expected, rel=1e-6)
    # disjoint windows: the first token of each window has no context
    out = perplexity(model, ids, seq_len=seq_len)
    assert out["val_tokens"] == n - math.ceil(n / seq_len)
    targets = torch.tensor([t for t in range(1, n) if t % seq_len])
    assert out["val_loss"] == pytest.approx(model.nll(ids, targets).mean().item(), rel=1e-6)


def test_oracle_has_perplexity_one_and_uniform_the_vocabulary_size():
    ids = torch.zeros(50, dtype=torch.int64)
    for t in range(1, 50):
        ids[t] = (3 * ids[t - 1] + 1) % V
    assert perplexity(Oracle(), ids, seq_len=8, stride=3)["ppl"] == pytest.approx(1.0, abs=1e-5)
    assert perplexity(Uniform(), ids, seq_len=8, stride=3)["ppl"] == pytest.approx(V, rel=1e-5)


def test_max_windows_scores_only_the_first_windows():
    model, ids = Bigram(), random_ids(100)
    out = perplexity(model, ids, seq_len=10, stride=4, max_windows=3)
    targets = torch.arange(1, 10 + 2 * 4)  # window 0 scores 1..9, windows 1 and 2 the next 4 each
    assert out["val_tokens"] == len(targets)
    assert out["val_loss"] == pytest.approx(model.nll(ids, targets).mean().item(), rel=1e-6)


def test_the_model_mode_is_restored():
    model = Bigram()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    for mode in (True, False):
        model.train(mode)
        perplexity(model, random_ids(30), seq_len=8)
        assert model.training is mode
    assert seen and not any(seen)


@pytest.mark.parametrize("world", [3, 10])
def test_ranks_share_the_windows_and_sum_to_the_single_process_result(monkeypatch, world):
    """7 windows over ``world`` ranks (with 10, some ranks have none); the reduction sums their parts."""
    model, ids = Bigram(), random_ids(40)
    kwargs = dict(seq_len=16, stride=4, batch_size=2)
    sent: list[list[float]] = []
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values, device: sent.append(list(values)) or values)
    single = perplexity(model, ids, **kwargs)
    totals = sent.pop()
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values, device: sent.append(list(values)) or totals)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        out = perplexity(model, ids, **kwargs)
        assert out["val_tokens"] == single["val_tokens"] and out["val_loss"] == single["val_loss"]
    assert len(sent) == world
    assert sum(s[1] for s in sent) == totals[1] and sum(s[2] for s in sent) == totals[2]
    assert sum(s[0] for s in sent) == pytest.approx(totals[0], rel=1e-12)
    assert sum(1 for s in sent if s[1] == 0) == max(world - 7, 0)


def test_bad_arguments_are_one_line_errors():
    model = Bigram()
    cases = [(dict(ids=random_ids(1), seq_len=8), DataError, "2 tokens"),
             (dict(ids=random_ids(20), seq_len=8, stride=9), ConfigError, "stride"),
             (dict(ids=random_ids(20), seq_len=1), ConfigError, "seq_len")]
    for kwargs, kind, named in cases:
        with pytest.raises(kind) as err:
            perplexity(model, **kwargs)
        assert "\n" not in str(err.value) and named in str(err.value)

"""Perplexity of a causal LM on one id stream, with the sliding windows of the transformers docs
("Perplexity of fixed-length models"), exact for any window length and stride."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lbc.errors import DataError, require
from lbc.run import distributed


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The (begin, end, first) of each window over ``n`` tokens: windows of ``seq_len`` tokens every
    ``stride`` tokens until one reaches the end; each scores the tokens [begin + first, end), those the
    previous window did not score (the first window all but its first token, which has no context)."""
    if n <= seq_len:
        return [(0, n, 1)]
    full = (n - seq_len) // stride + 1
    begins = list(range(0, full * stride, stride)) + ([full * stride] if (n - seq_len) % stride else [])
    later = max(seq_len - stride, 1)  # window k-1 (always full) ends seq_len - stride after window k begins
    return [(b, min(b + seq_len, n), 1 if k == 0 else later) for k, b in enumerate(begins)]


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, *, seq_len: int, stride: int | None = None, batch_size: int = 4,
               device: Any = "cpu", max_windows: int | None = None) -> dict:
    """``val_loss`` (mean NLL per predicted token, nats), ``ppl`` (its exp), ``val_tokens`` (predicted
    tokens) and ``tokens_per_s`` (tokens fed to the model per second, all ranks) of ``model`` on ``ids``.

    Windows as ``windows`` gives them (``stride`` defaults to ``seq_len``: disjoint windows, each of
    whose first tokens goes unscored); the NLL is summed over every scored token from the logits
    (``model(input_ids=...).logits``), not averaged per window. Windows of equal length run together,
    ``batch_size`` at a time. Under torch.distributed the ranks share the windows and sum NLL and counts;
    ``max_windows`` keeps only the first windows (a quick evaluation). The model's mode is restored.
    """
    stride = seq_len if stride is None else stride
    require(isinstance(seq_len, int) and seq_len >= 2, "seq_len", seq_len, "an integer >= 2")
    require(isinstance(stride, int) and 1 <= stride <= seq_len, "stride", stride, f"an integer in [1, seq_len={seq_len}]")
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
    require(max_windows is None or (isinstance(max_windows, int) and max_windows >= 1), "max_windows", max_windows,
            "None or a positive integer")
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = torch.device(device)
    wins = windows(ids.numel(), seq_len, stride)[:max_windows]
    rank, world = distributed.rank(), distributed.world_size()
    mine = wins[len(wins) * rank // world: len(wins) * (rank + 1) // world]

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll, count, fed = 0.0, 0, 0
    try:
        for group in _batches(mine, batch_size):
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            first = torch.tensor([f for _, _, f in group], device=device)
            lo = int(first.min())  # logits[:, j - 1] predicts x[:, j]; positions before ``lo`` are never scored
            logits = model(input_ids=x).logits[:, lo - 1:-1]
            labels = x[:, lo:].clone()
            labels[torch.arange(lo, x.shape[1], device=device) < first[:, None]] = -100
            losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            nll += losses.double().sum().item()
            count += int((labels != -100).sum())
            fed += x.numel()
    finally:
        model.train(was_training)
    nll, count, fed = distributed.all_reduce_sum([nll, count, fed], device)
    elapsed = time.perf_counter() - start
    if count == 0:
        raise DataError(f"perplexity: {ids.numel()} tokens in {len(wins)} window(s) of seq_len={seq_len} score no token")
    loss = nll / count
    return {"val_loss": loss, "ppl": math.exp(loss), "val_tokens": int(count),
            "tokens_per_s": fed / elapsed if elapsed > 0 else float("inf")}


def _batches(wins: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` in each batch."""
    out: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if out and len(out[-1]) < batch_size and out[-1][0][1] - out[-1][0][0] == w[1] - w[0]:
            out[-1].append(w)
        else:
            out.append([w])
    return out

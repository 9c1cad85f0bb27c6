"""One-shot calibration of a causal LM: the N:M masks (and SparseGPT's weights) of a method's layers.

:func:`one_shot` runs the calibration batches block-sequentially through the model's decoder blocks,
as the reference code of Wanda and SparseGPT does: the inputs of the first block are captured once;
then each block in turn runs on them with hooks on its selected Linear layers collecting the
criterion's statistics (Wanda: the sum of squares of every input feature; SparseGPT: ``X^T X``), its
layers are pruned, and the *pruned* block runs again to give the next block its inputs. Only one
block's statistics are held at a time. The model's weights are left as they were: the pruned
weights are written into the stored weights only while a block (or the model) runs, and restored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lbc.errors import ConfigError, is_number, require
from lbc.lm.model import decoder_blocks
from lbc.sparsity.base import SparsityMethod, stored_weight
from lbc.sparsity.nm import NMPattern
from lbc.sparsity.oneshot import magnitude_mask, sparsegpt_prune, wanda_mask
from lbc.sparsity.options import PRIORS

log = logging.getLogger(__name__)

__all__ = ["one_shot"]


class _BlockReached(Exception):
    """Raised by the pre-hook of the first decoder block: its inputs are captured, the rest need not run."""


class _Statistics:
    """Running statistics of one Linear layer's inputs: the sum of squares per feature (Wanda) or ``X^T X``."""

    def __init__(self, criterion: str) -> None:
        self.criterion = criterion
        self.value: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        value = x.square().sum(0) if self.criterion == "wanda" else x.T @ x
        self.value = value if self.value is None else self.value.add_(value)
        self.tokens += x.shape[0]


@contextlib.contextmanager
def _collecting(layers: Mapping[str, nn.Module], names: Iterable[str], criterion: str) -> Iterator[dict[str, _Statistics]]:
    """Forward hooks on ``names`` accumulating their inputs' statistics while the context is open."""
    stats = {name: _Statistics(criterion) for name in names}
    handles = [layers[name].register_forward_hook(lambda _m, args, _out, s=s: s.add(args[0]))
               for name, s in stats.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _pruned(layers: Mapping[str, nn.Module], names: Iterable[str], masks: Mapping[str, torch.Tensor],
            weights: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """The pruned weights of ``names`` written into their stored weights while the context is open."""
    saved: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            weight = stored_weight(layers[name])
            saved[name] = weight.detach().clone()
            weight.data.copy_(weights[name] if weights is not None else weight * masks[name])
        yield
    finally:
        for name, original in saved.items():
            stored_weight(layers[name]).data.copy_(original)


def _forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one calibration batch: token ids (B, T), or a mapping of its keywords (labels dropped)."""
    is_hf = hasattr(getattr(model, "config", None), "use_cache")
    device = next(model.parameters()).device
    if isinstance(batch, Mapping):
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k not in ("labels", "use_cache")}
    elif is_hf:
        kwargs = {"input_ids": batch.to(device)}
    else:
        return model(batch.to(device))
    return model(**kwargs, use_cache=False) if is_hf else model(**kwargs)


class _BlockCall:
    """One calibration batch's call of a decoder block: its arguments, with the hidden states swappable."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.positional = bool(args)
        self.hidden = args[0] if args else kwargs["hidden_states"]
        self.args, self.kwargs = args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}

    def __call__(self, block: nn.Module) -> torch.Tensor:
        if self.positional:
            out = block(self.hidden, *self.args, **self.kwargs)
        else:
            out = block(hidden_states=self.hidden, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _capture(model: nn.Module, first: nn.Module, batches: Sequence[Any]) -> list[_BlockCall]:
    """The inputs (args and kwargs) of the first decoder block for every batch; the model stops there."""
    calls: list[_BlockCall] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append(_BlockCall(args, kwargs))
        raise _BlockReached

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _forward(model, batch)
            except _BlockReached:
                continue
            raise RuntimeError("one_shot: the model's forward never ran its first decoder block")
    finally:
        handle.remove()
    return calls


def one_shot(
    model: nn.Module,
    method: SparsityMethod,
    criterion: str,
    batches: Iterable[Any] | None,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The ``criterion`` ("magnitude", "wanda" or "sparsegpt") N:M masks of every layer of ``method.layers``,
    and for "sparsegpt" the reconstructed weights (else None); keys are the layer names.

    ``batches``: calibration batches, each token ids (B, T) or a mapping of the model's keywords
    (``input_ids``, ``attention_mask``; ``labels`` is dropped); magnitude needs none. Wanda and
    SparseGPT run block-sequentially through the decoder blocks (:func:`lbc.lm.model.decoder_blocks`); selected
    layers before the first block are pruned first (from the captured forward), those after the last
    from one more forward of the pruned model. A model without recognisable blocks gets one forward
    that collects every layer's statistics at once. ``damp`` and ``blocksize``: SparseGPT's. The
    model's weights and train/eval modes are left as they were.
    """
    require(criterion in PRIORS, "sparsity.prior", criterion, f"choose from: {', '.join(PRIORS)}")
    layers, pattern = method.layers, method.pattern
    if criterion == "magnitude":
        return {name: magnitude_mask(stored_weight(m), pattern) for name, m in layers.items()}, None
    batches = [] if batches is None else list(batches)
    if not batches:
        raise ConfigError(f"sparsity.prior={criterion} calibrates on data: it needs calibration batches "
                          "(data.calibration_sequences >= 1), got none")
    if criterion == "sparsegpt":
        require(is_number(damp) and 0 < damp < 1, "sparsity.damp", damp, "use a number in (0, 1), e.g. 0.01")
        require(isinstance(blocksize, int) and blocksize >= pattern.m and blocksize % pattern.m == 0,
                "sparsity.blocksize", blocksize, f"use a multiple of M={pattern.m} (e.g. 128)")
    other = next((n for n, m in layers.items() if not isinstance(m, nn.Linear)), None)
    if other is not None:
        raise ConfigError(f"sparsity.prior={criterion} prunes Linear layers only; layer {other!r} is "
                          f"{type(layers[other]).__name__}: add it to sparsity.exclude or use magnitude")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            masks, weights = _Calibration(model, layers, criterion, pattern, damp, blocksize).run(batches, progress)
    finally:
        for module, training in modes.items():
            module.training = training
    return masks, weights


class _Calibration:
    """The block-sequential pass of :func:`one_shot`; ``masks`` and ``weights`` fill in as layers are pruned."""

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], criterion: str, pattern: NMPattern,
                 damp: float, blocksize: int) -> None:
        self.model, self.layers, self.criterion, self.pattern = model, layers, criterion, pattern
        self.damp, self.blocksize = damp, blocksize
        self.masks: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] | None = {} if criterion == "sparsegpt" else None

    def prune(self, stats: Mapping[str, _Statistics]) -> None:
        """Masks (and SparseGPT weights) of the layers in ``stats`` from their current stored weights."""
        for name, s in stats.items():
            weight = stored_weight(self.layers[name]).detach()
            if s.value is None:
                log.warning("%s: layer %r saw no calibration tokens; it gets the magnitude mask", self.criterion, name)
                self.masks[name] = magnitude_mask(weight, self.pattern)
                if self.weights is not None:
                    self.weights[name] = weight * self.masks[name]
            elif self.weights is None:
                self.masks[name] = wanda_mask(weight, s.value.sqrt(), self.pattern)
            else:
                self.weights[name], self.masks[name] = sparsegpt_prune(
                    weight, s.value, self.pattern, blocksize=self.blocksize, damp=self.damp)

    def pruned(self, names: Iterable[str]) -> contextlib.AbstractContextManager[None]:
        return _pruned(self.layers, names, self.masks, self.weights)

    def collecting(self, names: Iterable[str]) -> contextlib.AbstractContextManager[dict[str, _Statistics]]:
        return _collecting(self.layers, names, self.criterion)

    def run(self, batches: Sequence[Any], progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        blocks = decoder_blocks(self.model)
        if blocks is None:
            log.info("%s: no decoder blocks found (model._no_split_modules); one forward collects the statistics "
                     "of all %d layers at once (not block-sequential)", self.criterion, len(self.layers))
            with self.collecting(self.layers) as stats:
                for batch in batches:
                    _forward(self.model, batch)
            self.prune(stats)
            return self.masks, self.weights
        inside = {id(m) for m in blocks.modules()}
        outside = [n for n, m in self.layers.items() if id(m) not in inside]
        with self.collecting(outside) as stats:  # a selected layer that runs before the first block: prune it first
            calls = _capture(self.model, blocks[0], batches)
        front = {n: s for n, s in stats.items() if s.value is not None}
        if front:
            self.prune(front)
            with self.pruned(front):
                calls = _capture(self.model, blocks[0], batches)
        tail = [n for n in outside if n not in front]
        for index, block in enumerate(tqdm(blocks, desc=f"{self.criterion} (blocks)", disable=not progress)):
            own = {id(m) for m in block.modules()}
            names = [n for n, m in self.layers.items() if id(m) in own]
            with self.collecting(names) as stats:
                for call in calls:
                    call(block)
            self.prune(stats)
            if index + 1 < len(blocks):  # the next block's inputs, from this pruned block
                with self.pruned(names):
                    for call in calls:
                        call.hidden = call(block)
        if tail:
            log.info("%s: %d selected layers outside the decoder blocks (%s) calibrate on a forward of the "
                     "pruned model", self.criterion, len(tail), ", ".join(tail[:3]))
            with self.pruned(list(self.masks)), self.collecting(tail) as stats:
                for batch in batches:
                    _forward(self.model, batch)
            self.prune(stats)
        return self.masks, self.weights

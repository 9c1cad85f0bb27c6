"""ASP, NVIDIA apex automatic sparsity: dense training, one-shot magnitude pruning, masked fine-tuning.

The paper's ASP rows (Sec. 4.2, Table 1): pre-train dense, prune, re-train. The model trains dense
for ``dense_epochs``; the first :meth:`ASP.update` at or after that epoch prunes once to N:M (every
group keeps its N largest ``|w|``) and the mask stays fixed for ``finetune_epochs`` (None: the rest
of the schedule). The prune waits for ``update`` rather than happening in the constructor, so a
loop may load real weights after attaching (MMDetection does); ``dense_epochs=0`` prunes at
``update(0)``, before the first step. To start from a dense run's weights, load them with
:func:`lbc.io.load_model_weights` before attaching and set ``dense_epochs=0``: ASP reads no files.

Guarantee for pruned positions: the *effective* weight (what the forward uses, what
``layer.weight`` returns, what :meth:`detach` leaves) is exactly zero after the prune, whatever the
optimizer does. The prune *folds* the mask into the weight
(:class:`~lbc.sparsity.base.MaskParametrization`): the stored weight is zeroed there, and so is the
optimizer state shaped like it (momentum, Adam's moments, carried over from the dense phase) before
the next step; the weight gradient is masked, so the stored zeros stay exactly zero under any
weight decay, and the training forward uses the stored weight as it is, with no multiply. With an
optimizer whose state cannot be masked (factored moments) the layer unfolds: the forward multiplies
by the mask, and every :meth:`update` and :meth:`finalize` zero the stored weight again.

apex defaults that differ are options: ``prune_classifier`` (apex prunes it) and ``apex_dims``
(apex skips layers whose output dim is not a multiple of 8 or input dim not a multiple of 16).
apex's channel permutation search is out of scope: groups are pruned in their given order.
apex monkey-patches ``optimizer.step``; we do not: the masked backward lives in the parametrisation.

``prior`` (magnitude | wanda | sparsegpt): prune with a one-shot criterion's mask instead of plain
magnitude. The task computes those masks on the model as it starts (so ``dense_epochs`` must be 0)
and hands them, with SparseGPT's reconstructed weights, to :meth:`ASP.start_from`, which prunes at
once. ``prior="magnitude"`` without ``start_from`` prunes at ``update(0)`` exactly as plain ASP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, is_number, require
from lbc.sparsity.base import MaskParametrization, SparsityMethod, masked_gradient
from lbc.sparsity.nm import topn_mask
from lbc.sparsity.options import PRIORS, SparsityOptions
from lbc.sparsity.registry import METHODS
from lbc.sparsity.selection import stem_and_classifier

log = logging.getLogger(__name__)


@dataclass
class ASPOptions(SparsityOptions):
    """ASP (apex): dense for ``dense_epochs``, one-shot magnitude prune, masked fine-tuning."""

    method: str = "asp"
    dense_epochs: int = 0  # dense phase; the prune happens at this epoch (0: at the first step)
    finetune_epochs: float | None = None  # masked fine-tuning; None: the rest of the schedule
    prune_classifier: bool = False  # apex: true (also prunes the classifier)
    apex_dims: bool = False  # apex: true (skip layers with out % 8 or in % 16 != 0)
    prior: str | None = None  # prune with this one-shot mask (magnitude | wanda | sparsegpt); null: magnitude

    def __post_init__(self) -> None:
        super().__post_init__()
        require(isinstance(self.dense_epochs, int) and not isinstance(self.dense_epochs, bool)
                and self.dense_epochs >= 0, "sparsity.dense_epochs", self.dense_epochs,
                "use a whole number of epochs >= 0 (dense.pt is written at an epoch's end)")
        require(self.finetune_epochs is None or is_number(self.finetune_epochs) and self.finetune_epochs > 0,
                "sparsity.finetune_epochs", self.finetune_epochs, "use a number of epochs > 0 or null (the rest)")
        for key in ("prune_classifier", "apex_dims"):
            require(isinstance(getattr(self, key), bool), f"sparsity.{key}", getattr(self, key), "use true or false")
        require(self.prior is None or self.prior in PRIORS, "sparsity.prior", self.prior,
                f"choose from: {', '.join(PRIORS)}, or null (plain magnitude)")
        require(self.prior is None or self.dense_epochs == 0, "sparsity.dense_epochs", self.dense_epochs,
                f"sparsity.prior={self.prior} is computed on the model as it starts: use 0")


class _FixedMask(torch.autograd.Function):
    """Forward ``mask * W`` (``W`` itself when folded or the mask is full); backward ``mask * dL/dW_eff``."""

    @staticmethod
    def forward(ctx, weight, mask, folded):  # type: ignore[override]
        ctx.save_for_backward(mask)
        return weight.view_as(weight) if folded else weight * mask

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return masked_gradient(grad_out, mask), None, None


class ASPParametrization(MaskParametrization):
    """Per-layer fixed-mask state (ASP, the one-shot methods): a bool mask, all ones until the prune.

    Folded from the start (:class:`~lbc.sparsity.base.MaskParametrization`): a full mask costs no
    multiply, and :meth:`set_mask` zeroes the stored weight (and its optimizer state) at the prune.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device))
        self.folded = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask, folded = self.forward_mask(weight)
        plain = self.unrecorded(weight, folded)
        return plain if plain is not None else _FixedMask.apply(weight, mask, folded)

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor, weight: nn.Parameter) -> None:
        """Prune to ``mask`` (bool, weight-shaped): the stored ``weight`` is zeroed where it is 0, and kept so."""
        self.mask.copy_(mask)
        self.fold(weight)
        self.keep_zeros(weight)  # a weight that cannot fold (frozen, sharded) is zeroed all the same


@METHODS.register(options=ASPOptions)
class ASP(SparsityMethod):
    """Dense for ``dense_epochs``, one-shot magnitude prune to N:M, masked fine-tuning (apex ASP)."""

    def __init__(self, model: nn.Module, options: ASPOptions, input_size: Sequence[int] | str | None = None) -> None:
        self.dense_epochs, self.finetune_epochs = options.dense_epochs, options.finetune_epochs
        self.prune_classifier, self.apex_dims = options.prune_classifier, options.apex_dims
        self.pruned = False
        self._apex_skipped: dict[str, str] = {}
        super().__init__(model, options, input_size)
        for name, why in self._apex_skipped.items():
            del self.layers[name]
            self.dense_reasons[name] = why

    def excluded(self, model: nn.Module) -> list[str] | None:
        """``exclude``; unset with ``prune_classifier``: the stem only (apex prunes the classifier too)."""
        if self.options.exclude is None and self.prune_classifier:
            return stem_and_classifier(model)[0]
        return self.options.exclude

    def parametrization(self, name: str, module: nn.Module) -> nn.Module | None:
        out, inp = module.weight.shape[:2]
        if self.apex_dims and (out % 8 or inp % 16):
            self._apex_skipped[name] = f"apex_dims: output dim {out} not a multiple of 8 or input dim {inp} of 16"
            return None
        return ASPParametrization(module.weight)

    def _states(self) -> list[tuple[nn.Parameter, ASPParametrization]]:
        return [(m.parametrizations.weight.original, m.parametrizations.weight[0]) for m in self.layers.values()]

    @property
    def prior(self) -> str | None:
        """``options.prior``: the one-shot criterion whose masks :meth:`start_from` is given."""
        return self.options.prior

    @torch.no_grad()
    def start_from(self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Prune at once with the one-shot ``masks``; given ``weights`` (SparseGPT's reconstruction), copy them
        into the stored weights first. The pruned stored weights are zeroed and :meth:`update` prunes no more.

        Called once, after attaching and before training, never on resume (the checkpoint holds the
        masks and ``pruned``).
        """
        if self.prior is None:
            raise ConfigError(f"sparsity.prior=null: asp starts from no one-shot mask; set sparsity.prior "
                              f"({', '.join(PRIORS)}) to start from one")
        self.check_start_from(masks, weights)
        for name, module in self.layers.items():
            weight, state = module.parametrizations.weight.original, module.parametrizations.weight[0]
            if weights is not None:
                weight.copy_(weights[name])
            state.set_mask(masks[name], weight)
        self.pruned = True
        self._record_cost()
        log.info("asp: %d layers start from the %s mask (%s)%s", len(self.layers), self.prior, self.pattern,
                 " and its reconstructed weights" if weights is not None else "")

    @torch.no_grad()
    def prune(self) -> None:
        """One-shot magnitude pruning: keep the N largest ``|w|`` per group; zero the stored rest."""
        for weight, state in self._states():
            state.set_mask(topn_mask(weight, self.pattern), weight)
        self.pruned = True
        self._record_cost()
        log.info("asp: pruned %d layers to %s at epoch %g", len(self.layers), self.pattern, self.epoch)

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        for weight, state in self._states():
            state.keep_zeros(weight)  # nothing to do while folded: the zeros stay in place

    def update(self, epoch: float) -> None:
        """Prune at the first call with ``epoch >= dense_epochs`` (once); then keep stored pruned weights at 0."""
        self.check_attached()
        self.epoch = float(epoch)
        if not self.pruned and self.epoch >= self.dense_epochs:
            if self.prior not in (None, "magnitude"):
                raise ConfigError(f"sparsity.prior={self.prior}: asp was never given the one-shot masks (start_from); "
                                  "only a task that calibrates them (the language-model task) can start from a prior, "
                                  "elsewhere use sparsity.prior=null")
            self.prune()
        elif self.pruned:
            self._zero_pruned()

    def milestones(self) -> dict[str, int]:
        """Keep the dense hand-off checkpoint (``dense.pt``) when there is a dense phase."""
        return {"dense": self.dense_epochs} if self.dense_epochs > 0 else {}

    def phases(self) -> list[tuple[str, float | None]]:
        """``dense`` (when ``dense_epochs`` > 0) then ``finetune``; None as its length: the rest of the schedule."""
        out: list[tuple[str, float | None]] = [("dense", self.dense_epochs)] if self.dense_epochs > 0 else []
        return out + [("finetune", self.finetune_epochs)]

    def finalize(self) -> None:
        """Zero the stored pruned weights once more; raise if the pruned model is not N:M."""
        if not self.pruned:
            log.warning("asp: training ended at epoch %.2f before the prune at %g: the model is dense",
                        self.epoch, self.dense_epochs)
            return
        self._zero_pruned()
        if not self.is_exact_nm():
            raise RuntimeError(f"asp: training passed the prune at epoch {self.dense_epochs} but is not exactly {self.pattern}")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": self.pruned, "dense_epochs": self.dense_epochs}

    @classmethod
    def carried_state(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """``pruned``: a pruned source's masks stay as they are (no second prune at ``dense_epochs``)."""
        return {k: state[k] for k in ("pruned",) if k in state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pruned = bool(state["pruned"])

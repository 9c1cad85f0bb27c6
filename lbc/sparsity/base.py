"""The one sparsity abstraction: a method object that attaches masks to any ``nn.Module``.

A mask is a *reparametrisation* of an existing weight (``torch.nn.utils.parametrize``): the
user's Conv2d/Linear keep their classes, their forward code and the state-dict key of their
dense weight (``layer.weight``; the ``parametrizations.weight.original`` key is mapped back).
Each method supplies a small parametrisation module whose custom autograd function owns the
method's backward, so no trainer needs an "after backward" moment.

The trainer (and any other loop, e.g. MMDetection hooks) talks to a method only through:
``score_parameters``, ``param_groups``, ``update(epoch)``, ``state_dict``/``load_state_dict``,
``report``, ``masks``, ``milestones``, ``exclude_from_ddp`` and ``finalize``. Carrying a trained
model's sparsity into another model (a classification checkpoint into a detector's backbone) goes
through ``carried_state``, ``carried_mask`` and ``carry_in``; starting from one-shot masks
(``sparsity.prior``: magnitude, Wanda, SparseGPT) through ``prior``, ``start_from`` and ``check_start_from``.

Under DistributedDataParallel the method's own tensors (scores, masks, alive sets) stay outside
DDP (:meth:`SparsityMethod.exclude_from_ddp`): masks are equal on every rank by construction and
score gradients are averaged by the method itself, so a method may stop its score work at any
moment (LBC after t_f) without the DDP wrapper being rebuilt; mmengine wraps only once.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lbc.errors import ConfigError
from lbc.flops import MacProbe, TrainingFlops, layer_costs
from lbc.sparsity.nm import NMPattern, is_exactly_nm, is_nm, parse_pattern
from lbc.sparsity.options import SparsityOptions
from lbc.sparsity.selection import select_layers

log = logging.getLogger(__name__)

_ORIGINAL = "parametrizations.weight.original"
FIRST_FORWARD = "first_forward"  # input_size that measures each layer's MACs on the model's first forward


def _save_dense_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + _ORIGINAL
    if key in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(key)


def _load_dense_key(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    if prefix + "weight" in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "weight")


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight as stored (dense), without running a parametrisation's forward."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def attach_parametrization(module: nn.Module, parametrization: nn.Module) -> list[Any]:
    """Reparametrise ``module.weight`` in place, keeping its dense state-dict key ``weight``."""
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
    handles = [
        module.register_state_dict_post_hook(_save_dense_key),
        module.register_load_state_dict_pre_hook(_load_dense_key),
    ]
    if isinstance(parametrization, MaskParametrization):
        stored = module.parametrizations.weight.original
        handles.append(module.register_load_state_dict_post_hook(lambda *_: parametrization.refold(stored)))
    return handles


def float_view(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``dtype`` copy of the bool buffer ``name`` of ``module``, remade only when the buffer changed.

    On CPU, ``weight * float_mask`` is about 20x faster than ``torch.where(bool_mask, weight, 0)``,
    while the buffer itself stays bool so that EMA copies it instead of averaging it. The cache is
    keyed on the buffer's version counter (bumped by every in-place write: removals,
    ``load_state_dict``, EMA's ``copy_``), its storage and the dtype; deepcopy and ``.to()`` give new
    storage, so a copied or moved module never uses a stale cache.
    """
    buffer = getattr(module, name)
    if torch.compiler.is_compiling():  # traced: the compiler fuses the conversion into its kernels
        return buffer.to(dtype)
    return _derived(module, name, dtype, lambda: buffer.to(dtype))


def _derived(module: nn.Module, name: str, tag: Any, make: Any) -> Any:
    """``make()`` of the buffer ``name`` of ``module``, cached under ``tag`` until the buffer changes
    (its version counter or storage; see :func:`float_view`)."""
    buffer = getattr(module, name)
    key = (buffer._version, buffer.data_ptr())
    cache = module.__dict__.setdefault("_derived", {})
    hit = cache.get((name, tag))
    if hit is None or hit[0] != key:
        hit = cache[(name, tag)] = (key, make())
    return hit[1]


def mask_is_full(module: nn.Module, name: str = "mask") -> bool:
    """Whether the bool buffer ``name`` of ``module`` keeps everything, remade only when the buffer changed.

    A full mask makes ``W * B`` the identity: the forward and backward then skip the multiply (an
    LBC layer before its first removal, ASP's dense phase). Cached as :func:`float_view` is.
    """
    if torch.compiler.is_compiling():
        return False  # traced: one graph for every mask
    return _derived(module, name, "full", lambda: bool(getattr(module, name).all()))


def masked_gradient(grad: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``grad * mask`` for a mask parametrisation's backward (``mask=None``: full, ``grad`` itself).

    The incoming gradient of ``B * W`` is the layer's own (the convolution's or matmul's fresh weight
    gradient), so it is masked in place: one pass that writes memory already in cache, about twice as
    fast on CPU as a new tensor. Not when the gradient is a broadcast view (``weight.sum()``), of
    another dtype, or part of a graph itself (``create_graph=True``).
    """
    if mask is None:
        return grad
    if grad.is_contiguous() and grad.dtype == mask.dtype and not torch.is_grad_enabled():
        return grad.mul_(mask)
    return grad * mask


# Folded weights whose optimizer state still has to be masked, by id of the stored weight.
_PENDING_STATE: dict[int, tuple[weakref.ref, weakref.ref]] = {}
_STATE_HOOK: Any = None


def _mask_pending_optimizer_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer step pre-hook: mask the state of the folded weights this optimizer holds."""
    if not _PENDING_STATE:
        return
    gone = [k for k, (weight_ref, owner_ref) in _PENDING_STATE.items() if weight_ref() is None or owner_ref() is None]
    for key in gone:  # a model that no longer exists: nothing to mask, and no cost at later steps
        del _PENDING_STATE[key]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for key in [k for k in _PENDING_STATE if k in held]:
        weight_ref, owner_ref = _PENDING_STATE.pop(key)
        weight, owner = weight_ref(), owner_ref()
        if weight is not None and owner is not None:
            owner.mask_optimizer_state(weight, optimizer.state.get(weight, {}))


class MaskParametrization(nn.Module):
    """A parametrisation with a bool ``mask`` buffer (``B``) whose training forward can skip ``W * B``.

    *Folding* (:meth:`fold`) zeroes the stored weight wherever the mask is 0 and keeps it so: before
    the next step of every optimizer that holds the weight, its state shaped like the weight
    (momentum, Adam's moments) is zeroed there too. The masked weight gradient then leaves those
    zeros exactly in place under SGD, Adam(W), LAMB or LARS, with any weight decay, so the training
    forward needs no multiply: the weight *is* ``B * W``. Only the gradient is masked, once. A state
    the mask cannot be applied to (a factored second moment) unfolds the layer: the forward
    multiplies again. Evaluation always multiplies (an EMA copy averages stored weights that were
    never zeroed). A layer is folded only while its mask is fixed (ASP after its prune, LBC between
    removals with ``removal=paper``), never a distributed (DTensor) or frozen weight. Loading a state
    dict re-folds (:meth:`refold`). Writing a folded stored weight by hand breaks the promise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.folded = False
        self.fold_allowed = True  # False: always multiply (FSDP2 shards the weight and its optimizer state)

    def forward_mask(self, weight: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """``(mask, folded)`` for this forward: the float mask (None when it keeps everything) and whether
        the stored weight may be used as it is (folded, in training mode)."""
        if mask_is_full(self):
            return None, True
        return float_view(self, "mask", weight.dtype), self.folded and self.training

    def unrecorded(self, weight: torch.Tensor, folded: bool) -> torch.Tensor | None:
        """The effective weight without the autograd function when no graph is recorded and the stored weight
        is it already (folded or a full mask): a detached alias, as ``B * W`` under no_grad needs no grad
        (an alias that required grad would look like a leaf to hooks such as FlopCounterMode's). Else None."""
        return weight.detach() if folded and not torch.is_grad_enabled() else None

    @torch.no_grad()
    def fold(self, weight: nn.Parameter) -> None:
        """Zero ``weight`` (the stored weight) where the mask is 0, and its optimizer state before the next step."""
        if not self.fold_allowed or _is_dtensor(weight) or not weight.requires_grad:  # sharded (the mask is
            self.folded = False  # whole), or frozen (it stays as it was loaded): multiply instead
            return
        weight.mul_(float_view(self, "mask", weight.dtype))
        self.folded = True
        global _STATE_HOOK
        if _STATE_HOOK is None:
            _STATE_HOOK = register_optimizer_step_pre_hook(_mask_pending_optimizer_state)
        _PENDING_STATE[id(weight)] = (weakref.ref(weight), weakref.ref(self))

    def refold(self, weight: nn.Parameter) -> None:
        """After a state dict was loaded: fold again if folded (the loaded weight may not hold the zeros)."""
        if self.folded:
            self.fold(weight)

    @torch.no_grad()
    def mask_optimizer_state(self, weight: nn.Parameter, state: Mapping[str, Any]) -> None:
        """Zero the entries of ``state`` shaped like ``weight`` where the mask is 0 (and the weight itself)."""
        mask = self.mask
        weight.mul_(float_view(self, "mask", weight.dtype))
        for value in state.values():
            if not torch.is_tensor(value) or value.numel() <= 1:
                continue  # step counters
            if value.shape != weight.shape:  # e.g. Adafactor's factored moments: cannot keep zeros in place
                self.folded = False
                log.info("sparsity: optimizer state of shape %s for a weight of shape %s: this layer multiplies "
                         "by its mask in every forward instead", tuple(value.shape), tuple(weight.shape))
                return
            value.mul_(mask.to(value.dtype))

    @torch.no_grad()
    def keep_zeros(self, weight: nn.Parameter) -> None:
        """Zero the stored weight where the mask is 0, unless folding keeps it so already."""
        if not self.folded:
            weight.mul_(float_view(self, "mask", weight.dtype))


def disable_folding(model: nn.Module) -> None:
    """Keep every mask of ``model`` a multiply (no folding, :class:`MaskParametrization`): for an optimizer
    that holds shards of the weights (FSDP2), whose state the fold could not mask."""
    for module in model.modules():
        if isinstance(module, MaskParametrization):
            module.fold_allowed = module.folded = False


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def average_gradient_across_processes(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: average ``param.grad`` over the processes, as DDP would.

    For parameters kept outside DDP (a method's scores). Averaging the accumulated gradient is
    also right under gradient accumulation: the part already averaged is equal on every rank.
    """
    if param.grad is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(param.grad)
        param.grad.div_(dist.get_world_size())


class SparsityMethod:
    """Base class: attach/detach, masks, figures; layer selection and FLOPs are delegated.

    Subclasses are registered with their options dataclass (``@METHODS.register(options=...)``,
    which sets ``name`` and ``Options``), take the checked options object, return a
    parametrisation from :meth:`parametrization` (or None to leave a layer untouched) and may
    override :meth:`update`, :meth:`unit_cost` and friends. Layers are chosen by
    :func:`~lbc.sparsity.selection.select_layers`; the training-FLOPs figures are kept by a
    :class:`~lbc.flops.TrainingFlops` meter (``self.flops``).
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type[SparsityOptions]] = SparsityOptions
    masks_weights: ClassVar[bool] = True  # False: the method attaches nothing (dense), its models hold no masks

    def __init__(
        self,
        model: nn.Module,
        options: SparsityOptions,
        input_size: Sequence[int] | str | None = None,
    ) -> None:
        taken = next((n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")), None)
        if taken is not None:
            raise ConfigError(f"layer {taken!r} already has a reparametrised weight (a sparsity method is "
                              "attached): call .detach() on that method before attaching another")
        self.model = model
        self.options = options
        self.pattern = parse_pattern(options.pattern)
        selection = select_layers(model, self.pattern, self.excluded(model), options.strict)
        self.exclude = selection.exclude
        self.layers: dict[str, nn.Module] = selection.layers
        self.dense_reasons: dict[str, str] = selection.dense_reasons
        if not self.layers:  # a run that trains a dense model and reports it as "done" is worse than a stop
            excluded = sum(r.startswith("excluded") for r in self.dense_reasons.values())
            raise ConfigError(
                f"sparsity.pattern={self.pattern}: no Conv2d/Linear layer of the model can be {self.pattern} "
                f"({excluded} excluded, {len(self.dense_reasons) - excluded} whose input dimension M={self.pattern.m} "
                "does not divide); pick another pattern or sparsity.exclude"
            )
        self._detached = False
        # input_size: (C, H, W) counts MACs now with a made-up input; "first_forward" measures them on
        # the model's first real forward (a detector cannot run a plain tensor); None: weight counts.
        measure = input_size == FIRST_FORWARD
        if input_size is not None and not measure and not isinstance(input_size, (tuple, list)):
            raise ConfigError(f"input_size={input_size!r}; use (C, H, W), {FIRST_FORWARD!r} or None")
        self.flops = TrainingFlops(layer_costs(model, None if measure else input_size), self.unit_cost, measure)
        self._probe = MacProbe(model, self.flops.set_layer_cost) if measure else None
        self._handles: list[Any] = []
        for name, module in self.layers.items():
            parametrization = self.parametrization(name, module)
            if parametrization is not None:
                self._handles += attach_parametrization(module, parametrization)
        for param in self.score_parameters():
            self._handles.append(param.register_post_accumulate_grad_hook(average_gradient_across_processes))
        self.epoch = 0.0
        self.flops.record(0.0, self.densities())

    # --- what a method supplies -------------------------------------------------------------
    def parametrization(self, name: str, module: nn.Module) -> nn.Module | None:
        """The reparametrisation of ``module.weight`` (None: leave the layer as it is)."""
        return None

    def excluded(self, model: nn.Module) -> list[str] | None:
        """Module-name globs kept dense: ``options.exclude`` (None: the stem and the classifier)."""
        return self.options.exclude

    def unit_cost(self, density: float) -> float:
        """Cost of one training step of a layer at ``density``, relative to dense (fwd 1 + bwd 2).

        Mask-based methods with a sparse backward (LBC, ASP fine-tuning) pay ``density`` for all
        three units; SR-STE overrides this with its dense backward.
        """
        return density

    def layer_mask(self, name: str) -> torch.Tensor | None:
        """Current 0/1 (bool) mask of layer ``name``, shaped like its weight; None when dense."""
        module = self.layers[name]
        if not parametrize.is_parametrized(module, "weight"):
            return None
        return module.parametrizations.weight[0].mask

    # --- the interface the trainer uses ------------------------------------------------------
    def score_parameters(self) -> list[nn.Parameter]:
        """Parameters the method owns and learns (LBC's scores); excluded from the model's groups."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups for :meth:`score_parameters`.

        The one way to build an optimizer for a sparse model: the model's parameters without
        :meth:`score_parameters` (grouped as the loop likes), plus these groups.
        """
        return []

    def owned_tensor_names(self, root: nn.Module) -> list[str]:
        """Names in ``root`` of the parameters and buffers the method owns (scores, masks, alive sets).

        The dense weights (``...parametrizations.weight.original``) are the model's, not listed.
        """
        owned = {
            id(t)
            for module in self.layers.values()
            if parametrize.is_parametrized(module, "weight")
            for t in itertools.chain(module.parametrizations.weight[0].parameters(),
                                     module.parametrizations.weight[0].buffers())
        }
        named = itertools.chain(root.named_parameters(remove_duplicate=False), root.named_buffers(remove_duplicate=False))
        return sorted({name for name, t in named if id(t) in owned})

    def exclude_from_ddp(self, root: nn.Module) -> None:
        """Keep the method's tensors out of a DistributedDataParallel wrapping of ``root`` (call before wrapping).

        DDP then neither broadcasts masks (equal on every rank) nor reduces scores (averaged by a
        hook of the method), and a change of the scores' ``requires_grad`` needs no new wrapper.
        """
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, self.owned_tensor_names(root))

    def update(self, epoch: float) -> None:
        """Advance the method to (fractional) ``epoch``; idempotent and cheap when nothing changes."""
        self.check_attached()
        self.epoch = float(epoch)

    def check_attached(self) -> None:
        """Raise if :meth:`detach` was called: the masks are baked in, nothing is left to advance."""
        if self._detached:
            raise RuntimeError(f"{self.name}: update() after detach(): the method was detached and its masks "
                               "baked into the weights; attach a new one with lbc.sparsify(...)")

    def milestones(self) -> dict[str, int]:
        """Checkpoints worth keeping by name: ``{name: epoch}`` (the state after that many epochs)."""
        return {}

    def phases(self) -> list[tuple[str, float | None]]:
        """Named training phases in epochs, each with its own lr schedule (ASP: dense, finetune).

        Empty: one phase spanning the whole schedule. When given, they must add up to its epochs;
        the last phase's length may be None, meaning "the rest of the schedule": the trainer fills
        it in (schedule epochs minus the other phases).
        """
        return []

    def finalize(self) -> None:
        """End-of-training check of the method's promise; raises when it is broken."""

    # --- starting from a one-shot mask (sparsity.prior) ----------------------------------------
    @property
    def prior(self) -> str | None:
        """The one-shot criterion (one of :data:`~lbc.sparsity.options.PRIORS`) whose masks the method
        starts from, or None: the task computes those masks and hands them to :meth:`start_from`."""
        return None

    def start_from(self, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Start from one-shot ``masks`` (and new stored ``weights``, SparseGPT's reconstruction), keyed as
        :attr:`layers`.

        Called once, after attaching and before training (before the optimizer is built), never on
        resume: a checkpoint already holds what it set. The base method cannot: a one-line ConfigError.
        """
        raise ConfigError(f"sparsity.prior: {self.name} cannot start from a one-shot mask")

    def check_start_from(self, masks: Mapping[str, torch.Tensor],
                         weights: Mapping[str, torch.Tensor] | None = None) -> None:
        """Check what :meth:`start_from` is given: one mask per layer of :attr:`layers` (no more), bool,
        shaped like its weight and exactly N:M of :attr:`pattern`; ``weights`` (if given) the same keys,
        floating point and weight-shaped. A one-line ConfigError naming the first layer that is wrong."""
        key = "sparsity.prior" if self.prior is None else f"sparsity.prior={self.prior}"
        for what, given in (("mask", masks), ("weight", weights)):
            if given is None:
                continue
            missing = [n for n in self.layers if n not in given]
            unknown = [n for n in given if n not in self.layers]
            if missing:
                raise ConfigError(f"{key}: no one-shot {what} for layer {missing[0]!r} "
                                  f"({len(missing)} of the {len(self.layers)} layers of {self.name} have none)")
            if unknown:
                raise ConfigError(f"{key}: a one-shot {what} for {unknown[0]!r}, which is not a layer of {self.name} "
                                  f"(its layers: {', '.join(list(self.layers)[:3])}{', ...' if len(self.layers) > 3 else ''})")
            for name, module in self.layers.items():
                tensor, shape = given[name], tuple(stored_weight(module).shape)
                if not isinstance(tensor, torch.Tensor):
                    raise ConfigError(f"{key}: the one-shot {what} of layer {name!r} is a {type(tensor).__name__}, "
                                      "not a tensor")
                if tuple(tensor.shape) != shape:
                    raise ConfigError(f"{key}: the one-shot {what} of layer {name!r} has shape {tuple(tensor.shape)}, "
                                      f"not its weight's {shape}")
                if what == "weight":
                    if not tensor.is_floating_point():
                        raise ConfigError(f"{key}: the one-shot weight of layer {name!r} is {tensor.dtype}, "
                                          "not floating point")
                    continue
                if tensor.dtype != torch.bool:
                    raise ConfigError(f"{key}: the one-shot mask of layer {name!r} is {tensor.dtype}, not bool")
                if not is_exactly_nm(tensor, self.pattern):
                    raise ConfigError(f"{key}: the one-shot mask of layer {name!r} is not exactly {self.pattern} "
                                      f"(every group of {self.pattern.m} inputs must keep {self.pattern.n})")

    def masks(self) -> dict[str, torch.Tensor]:
        """``{weight name: 0/1 float tensor shaped like the weight}`` for every masked layer."""
        out = {}
        for name in self.layers:
            mask = self.layer_mask(name)
            if mask is not None:
                out[f"{name}.weight" if name else "weight"] = mask.float()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Schedule bookkeeping; per-layer tensors (masks, scores) live in the model's state dict.

        Keys: ``method``, ``pattern``, ``epoch``, ``cost_timeline`` and each method's extras.
        """
        return {"method": self.name, "pattern": str(self.pattern), "epoch": self.epoch, **self.flops.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name or state.get("pattern") != str(self.pattern):
            raise ConfigError(
                f"sparsity state is for {state.get('method')} {state.get('pattern')}, "
                f"not {self.name} {self.pattern}: use the same sparsity config to resume"
            )
        self.epoch = float(state["epoch"])
        self.flops.load_state_dict(state)
        if self.flops.measured and self._probe is not None:  # the saved run measured its layers already
            self._probe.remove()

    # --- carrying a trained model's sparsity into another model ---------------------------------
    @classmethod
    def carried_state(cls, state: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of a saved :meth:`state_dict` that another model's method takes over with the
        masks: where the source is on its schedule. The rest (epoch, cost timeline) is the new model's."""
        return {}

    @classmethod
    def carried_mask(cls, weight: torch.Tensor, mask: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
        """The mask another model starts from, given a layer's saved (dense) weight and mask buffer."""
        return mask

    def carry_in(self, state: Mapping[str, Any] | None) -> dict[str, Any]:
        """Continue from masks just loaded into this method's layers (the model's state dict holds them)
        and, given the source's saved ``state``, from its place on the schedule. Returns what was carried."""
        carried = {} if state is None else self.carried_state(state)
        if state is not None:
            self.load_state_dict({**self.state_dict(), **carried})
        self._record_cost()
        return carried

    def detach(self) -> None:
        """Remove the reparametrisations, leaving each weight as its masked value ``B * W``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._probe is not None:
            self._probe.remove()
        self._detached = True
        for module in self.layers.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

    # --- figures -----------------------------------------------------------------------------
    def densities(self) -> dict[str, float]:
        """Fraction of weights kept, per Conv2d/Linear layer (dense layers at 1.0)."""
        out = dict.fromkeys(self.layer_cost, 1.0)
        for name in self.layers:
            mask = self.layer_mask(name)
            if mask is not None:  # a count, not a float mean: no float copy of the mask, exact beyond 2^24;
                # rounded to float32 as the mean was (correctly rounded: a double rounding of a quotient is)
                out[name] = float(torch.tensor(mask.count_nonzero().item() / mask.numel(), dtype=torch.float32))
        return out

    def step_cost(self, densities: dict[str, float] | None = None) -> float:
        """Training FLOPs of one step relative to the dense model (paper Table 1, "FLOPs (Train)")."""
        return self.flops.step_cost(self.densities() if densities is None else densities)

    def _record_cost(self) -> None:
        """Note that the step cost changed at ``self.epoch`` (call after a mask change)."""
        self.flops.record(self.epoch, self.densities())

    def train_flops_ratio(self, epoch: float | None = None) -> float:
        """Training FLOPs from epoch 0 to ``epoch`` over the dense model's, the cost integrated in time."""
        return self.flops.train_flops_ratio(self.epoch if epoch is None else epoch)

    @property
    def layer_cost(self) -> dict[str, float]:
        """Dense cost of every Conv2d/Linear layer (MACs, or weight counts without ``input_size``)."""
        return self.flops.layer_cost

    def is_exact_nm(self) -> bool:
        """Every selected layer's mask keeps exactly N of every M: N:M at the pattern's density."""
        return all(
            (mask := self.layer_mask(name)) is not None and is_exactly_nm(mask, self.pattern) for name in self.layers
        )

    def extra_layer_figures(self, name: str) -> dict[str, Any]:
        return {}

    def report(self) -> dict[str, Any]:
        """Global scalars (for TensorBoard and metrics.jsonl) and a per-layer table."""
        densities = self.densities()
        weights = {n: stored_weight(m).numel() for n, m in self.model.named_modules() if n in self.layer_cost}
        kept = sum(densities[n] * w for n, w in weights.items())
        layers = []
        for name, density in densities.items():
            row: dict[str, Any] = {"name": name, "shape": list(stored_weight(self.model.get_submodule(name)).shape)}
            row["density"] = density
            if name in self.layers:
                mask = self.layer_mask(name)
                row["nm"] = bool(mask is not None and is_nm(mask, self.pattern))
                row.update(self.extra_layer_figures(name))
            else:
                row["dense_reason"] = self.dense_reasons.get(name, "")
            layers.append(row)
        scalars = {
            "density": kept / max(1, sum(weights.values())),
            "exact_nm": float(self.is_exact_nm()) if self.layers else 0.0,
            "train_flops_ratio": self.train_flops_ratio(),
            "step_flops_ratio": self.step_cost(densities),
        }
        scalars.update(self.extra_scalars())
        return {"scalars": scalars, "layers": layers}

    def extra_scalars(self) -> dict[str, float]:
        return {}

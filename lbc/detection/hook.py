"""``SparsityHook``: drives a :class:`~lbc.detection.model.SparseDetector`'s sparsity method inside mmengine's loops.

mmengine owns the loop; the method needs five moments of it: before each train iteration (advance the
schedule to the fractional epoch), the log moment (scalars into the message hub, so LoggerHook prints them
and the visualiser's backends write them), the end of each validation (one record per epoch in
``<work_dir>/metrics.jsonl``, the schema of :mod:`lbc.run.records`, and its progress line
``epoch 3/6: loss 1.2345  bbox_mAP 0.015  ...`` built from it by the formatter every lbc task uses), saving and
loading a checkpoint (the schedule's bookkeeping and the RNG states travel with it, so a resumed run continues
exactly), and the end of training (the method's final promise is checked, on the model the last checkpoint holds).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mmdet.registry import HOOKS
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from lbc.engine.checkpoint import gather_rng_states, restore_rng_states, rng_state, set_rng_state
from lbc.errors import ConfigError
from lbc.run.records import MetricsRecord, progress_line, sparsity_scalars
from lbc.sparsity import SparsityMethod

__all__ = ["SparsityHook", "find_sparsity"]

STATE_KEY = "lbc_sparsity"  # the method's schedule bookkeeping in an mmengine checkpoint
RNG_KEY = "lbc_rng"  # every rank's torch / cuda / numpy / python RNG states when the checkpoint was saved
SINCE_KEY = "lbc_record_since"  # the next record's start: {"iter", "seconds" of training since then}


def find_sparsity(model: Any) -> SparsityMethod:
    """The sparsity method of ``model`` (a SparseDetector, possibly wrapped by DDP / an mmengine wrapper)."""
    module = model.module if is_model_wrapper(model) else model
    sparsity = getattr(module, "sparsity", None)
    if not isinstance(sparsity, SparsityMethod):
        raise ConfigError(f"SparsityHook needs model=dict(type='SparseDetector', ...); the model is "
                          f"{type(module).__name__}")
    return sparsity


@HOOKS.register_module()
class SparsityHook(Hook):
    """Advance, log, checkpoint and finalise the SparseDetector's sparsity method.

    Args:
        log_interval: train iterations between updates of the ``train/sparsity/<name>`` scalars in the
            message hub (also at each epoch's first and last iteration and whenever the masks change).

    After each validation rank 0 appends ``{"epoch", "step", "train_loss", "lr", "seconds", <val metrics>,
    "sparsity/<name>"...}`` to ``<work_dir>/metrics.jsonl`` (:mod:`lbc.run.records`, the record every lbc task
    writes) and logs its progress line: to lbc's logger when logging is set up for it (``lbc-train``: the
    console and ``<run_dir>/train.log``), else to mmengine's (a plain mmdet run).
    """

    priority = "NORMAL"  # runs before LoggerHook (BELOW_NORMAL): the logged scalars are this iteration's

    def __init__(self, log_interval: int = 50) -> None:
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ConfigError(f"SparsityHook log_interval={log_interval!r} is not allowed; use an integer >= 1")
        self.log_interval = log_interval
        self._changed = False  # the last update changed the masks: log the scalars now
        self._rng_before_val: dict[str, Any] | None = None
        self._since: tuple[int, float] | None = None  # (iteration, perf_counter) of the last record, or the start
        self._resumed_since: tuple[int, float] | None = None  # (iteration, seconds) a checkpoint inside an epoch held
        self._gathered: tuple[int, list[dict[str, Any]]] | None = None  # (iteration, every rank's RNG states)

    # --- training -----------------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        """Start the clock of the first record: ``train_loss`` and ``seconds`` count from here (after a resume from
        an epoch's checkpoint, from the resumed iteration; from one inside an epoch, from where that epoch's record
        began, with its seconds so far: the split epoch's record is the uninterrupted one's)."""
        if self._resumed_since is not None:
            iteration, seconds = self._resumed_since
            self._since, self._resumed_since = (iteration, time.perf_counter() - seconds), None
        else:
            self._since = (runner.iter, time.perf_counter())

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """Advance the method to the fractional epoch ``iter / iters per epoch`` (idempotent)."""
        sparsity = find_sparsity(runner.model)
        before = _mask_versions(sparsity)
        sparsity.update(runner.iter / len(runner.train_dataloader))
        self._changed = _mask_versions(sparsity) != before

    def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        """Put the sparsity scalars into the message hub every ``log_interval`` iterations (and on changes)."""
        due = (self._changed or batch_idx == 0 or self.every_n_train_iters(runner, self.log_interval)
               or self.end_of_epoch(runner.train_dataloader, batch_idx))
        if due:
            for name, value in find_sparsity(runner.model).report()["scalars"].items():
                runner.message_hub.update_scalar(f"train/sparsity/{name}", value)
        self._changed = False

    def after_train_epoch(self, runner: Any) -> None:
        """Gather every rank's RNG states for the epoch's checkpoint (CheckpointHook saves after this hook)."""
        self.gather_rng_states(runner)

    def gather_rng_states(self, runner: Any) -> None:
        """Collect every rank's RNG states for a checkpoint about to be written at this iteration.

        mmengine's ``Runner.save_checkpoint`` runs on rank 0 only, so :meth:`before_save_checkpoint` cannot ask
        the other ranks: this collective runs on every rank just before (after each epoch here, and before an
        ``iter_<n>.pth`` in lbc's control hook).
        """
        self._gathered = (runner.iter, gather_rng_states())

    def after_train(self, runner: Any) -> None:
        """Check the method's promise (``finalize``) and log a one-line summary.

        The schedule is not advanced past the last iteration's update (``epochs - 1 / iterations per epoch``,
        as classification's loop leaves it): the model in memory stays the one the last checkpoint and the
        last validation hold, so the figures reported at the end are theirs. A schedule that has not ended
        (``t_f`` at or past the epochs trained) is the method's ``finalize`` warning (LBC: "the model is not
        N:M yet", on lbc's console) and shows as ``exact_nm 0``.
        """
        sparsity = find_sparsity(runner.model)
        sparsity.finalize()
        scalars = sparsity.report()["scalars"]
        figures = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        trained = runner.iter / len(runner.train_dataloader)  # epochs trained (the schedule stands 1 iteration short)
        runner.logger.info(f"sparsity {sparsity.name} {sparsity.pattern} at epoch {trained:g}: {figures}")

    # --- validation ---------------------------------------------------------------------------
    def before_val(self, runner: Any) -> None:
        """Keep the RNG states: validation must not change the training's random stream (exact resume)."""
        self._rng_before_val = rng_state()

    def after_val(self, runner: Any) -> None:
        if self._rng_before_val is not None:
            set_rng_state(self._rng_before_val)
            self._rng_before_val = None

    def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
        """Append the record ``{"epoch", "step", "train_loss", "lr", "seconds", <val metrics>, "sparsity/<name>"...}``
        and log its progress line (rank 0): epochs and iterations completed (mmengine has counted this epoch's
        before it validates); the training figures are those since the last record (:func:`_train_figures`)."""
        record = {"epoch": runner.epoch, "step": runner.iter, **_train_figures(runner, self._since), **(metrics or {}),
                  **sparsity_scalars(find_sparsity(runner.model))}
        main = is_main_process()
        written = MetricsRecord(runner.work_dir, enabled=main).append(record)
        if main:
            lbc_log = logging.getLogger("lbc")
            (lbc_log if lbc_log.hasHandlers() else runner.logger).info(progress_line(written, runner.max_epochs))
        self._since = (runner.iter, time.perf_counter())

    # --- checkpoints --------------------------------------------------------------------------
    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Store the schedule's bookkeeping, every rank's RNG states and the record's clock (tensors, numbers:
        weights-only loadable). A save no gather preceded (a checkpoint interval in iterations set in the mmdet
        config) holds rank 0's states only; every rank resumes with them."""
        checkpoint[STATE_KEY] = find_sparsity(runner.model).state_dict()
        gathered = self._gathered
        checkpoint[RNG_KEY] = gathered[1] if gathered is not None and gathered[0] == runner.iter else [rng_state()]
        if self._since is not None:
            checkpoint[SINCE_KEY] = {"iter": self._since[0], "seconds": time.perf_counter() - self._since[1]}

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Restore the schedule's bookkeeping (masks and scores come with the model's state dict) and this rank's
        RNG states (:func:`~lbc.engine.checkpoint.restore_rng_states`: rank 0's if the process count changed).

        A plain mmdet checkpoint (``load_from`` a model-zoo detector: keys ``backbone.*``, ``neck.*``, ...) gets
        the wrapper's ``detector.`` prefix, so its weights load into the SparseDetector instead of being skipped.
        """
        state = checkpoint.get("state_dict")
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if isinstance(state, dict) and state and not any(k.startswith("detector.") for k in state):
            parts = tuple(f"{name}." for name, _ in model.detector.named_children())
            if any(k.startswith(parts) for k in state):
                checkpoint["state_dict"] = type(state)((f"detector.{k}", v) for k, v in state.items())
        if STATE_KEY in checkpoint:
            find_sparsity(runner.model).load_state_dict(checkpoint[STATE_KEY])
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY])
        since = checkpoint.get(SINCE_KEY)
        if isinstance(since, dict) and checkpoint.get("meta", {}).get("epoch_step"):  # written inside an epoch
            self._resumed_since = (int(since["iter"]), float(since["seconds"]))


def _train_figures(runner: Any, since: tuple[int, float] | None) -> dict[str, float]:
    """``train_loss``: the mean of the message hub's ``train/loss`` (one value per iteration, RuntimeInfoHook's)
    over the iterations since ``since``; ``lr``: the hub's ``train/lr`` of the last iteration (the first
    parameter group's, as mmengine logs it); ``seconds`` since ``since``. ``{}`` without a training (a bare
    ``runner.val()``)."""
    if since is None:
        return {}
    iteration, t0 = since
    scalars = runner.message_hub.log_scalars
    out: dict[str, float] = {}
    if "train/loss" in scalars and runner.iter > iteration:
        out["train_loss"] = float(scalars["train/loss"].mean(runner.iter - iteration))
    if "train/lr" in scalars:
        out["lr"] = float(scalars["train/lr"].current())
    out["seconds"] = time.perf_counter() - t0
    return out


def _mask_versions(sparsity: SparsityMethod) -> tuple[int, ...]:
    """Version counters of the layers' mask buffers: they change exactly when a mask is rewritten."""
    masks = (sparsity.layer_mask(name) for name in sparsity.layers)
    return tuple(-1 if m is None else m._version for m in masks)

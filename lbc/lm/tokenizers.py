"""Tokenizers that need no download: lbc's byte-level tokenizer (for models trained from scratch)."""

from __future__ import annotations

from typing import Any

BYTES = "bytes"  # model.tokenizer=bytes: one token per UTF-8 byte, plus an end-of-text token
END_OF_TEXT = "<|endoftext|>"


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per byte (GPT-2's byte-to-character alphabet, no
    merges) and ``<|endoftext|>`` (id 256) as beginning, end of text and padding: 257 ids, any text, no vocabulary
    file. What a model trained from scratch on a small corpus can use without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[END_OF_TEXT] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   model_max_length=1 << 30)

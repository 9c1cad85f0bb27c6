"""Causal language models through Hugging Face ``transformers`` (``task=lm``): models, text data,
one-shot calibration, perplexity and the training run; needs the ``lm`` extra."""

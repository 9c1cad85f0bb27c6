"""Text data for ``task=lm``: corpora (train/val text), token ids, packed blocks, step-indexed batches.

A corpus is two strings. Tokenized, each becomes one 1-D id tensor; training cuts it into
non-overlapping blocks of ``data.seq_len`` tokens (``PackedSequences``) and draws them by optimizer
step (``StepBatches``), so a run resumed at step k sees exactly the batches an uninterrupted run
would; validation scores the whole val ids with sliding windows (``lbc.lm.evaluate.perplexity``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lbc.errors import ConfigError, DataError, is_number, require

log = logging.getLogger("lbc")

SOURCES = ("pydoc_topics", "text", "wikitext2", "hf_disk")
VAL_FILES = ("val.txt", "valid.txt", "validation.txt")
VAL_SPLITS = ("validation", "valid", "test")
WIKITEXT2_FILES = ("wiki.train.raw", "wiki.valid.raw")
SEPARATOR = "\n\n"  # between documents, topics and dataset rows (as the transformers perplexity docs join WikiText)


@dataclass
class Corpus:
    """A named text corpus: the training text and the validation text."""

    name: str
    train: str = field(repr=False)
    val: str = field(repr=False)


def load_corpus(source: str, root: str | None = None, *, val_fraction: float = 0.1,
                text_column: str = "text") -> Corpus:
    """The train/val texts of ``data.source`` (``pydoc_topics``, ``text``, ``wikitext2``, ``hf_disk``) at ``root``.

    ``val_fraction`` is used where the source has no validation split of its own (pydoc topics, one
    text file, a Hugging Face dataset without splits). Every split is deterministic.
    """
    require(source in SOURCES, "data.source", source, f"one of {', '.join(SOURCES)}")
    require(is_number(val_fraction) and 0 < val_fraction < 1, "data.val_fraction", val_fraction,
            "a fraction strictly between 0 and 1")
    if source == "pydoc_topics":
        return _pydoc_topics(val_fraction)
    if root is None:
        raise ConfigError(f"data.root=None is not allowed; data.source={source} needs a path to read")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{path}: missing; data.source={source} reads its text from there")
    if source == "text":
        return _text(path, val_fraction)
    if source == "wikitext2":
        return _wikitext2(path)
    return _hf_disk(path, val_fraction, text_column)


def _pydoc_topics(val_fraction: float) -> Corpus:
    """Python's help topics, split by whole topics: in crc32 order of their keys, each topic goes to val
    while val stays within ``val_fraction`` of the characters (crc32, not hash(): the same split in every run)."""
    from pydoc_data.topics import topics

    keys = sorted(topics, key=lambda k: (zlib.crc32(k.encode()), k))
    target = val_fraction * sum(len(topics[k]) for k in keys)
    val, size = set(), 0
    for k in keys:
        if size + len(topics[k]) <= target:
            val.add(k)
            size += len(topics[k])
    if not val:
        val.add(keys[0])
    names = sorted(topics)
    return Corpus("pydoc_topics", SEPARATOR.join(topics[k] for k in names if k not in val),
                  SEPARATOR.join(topics[k] for k in names if k in val))


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    if not text.strip():
        raise DataError(f"{path}: holds no text")
    return text


def _text(path: Path, val_fraction: float) -> Corpus:
    """A .txt file split at the paragraph boundary nearest to the last ``val_fraction`` of its characters
    (a line boundary where it has none), or a folder with train.txt and val.txt (valid.txt, validation.txt)."""
    if path.is_dir():
        train = path / "train.txt"
        val = next((path / v for v in VAL_FILES if (path / v).is_file()), None)
        if not train.is_file() or val is None:
            raise DataError(f"{path}: a folder needs train.txt and one of {', '.join(VAL_FILES)}")
        return Corpus(path.name, _read(train), _read(val))
    text = _read(path)
    target = round(len(text) * (1 - val_fraction))
    for sep in (SEPARATOR, "\n"):
        cuts = [c for c in (text.rfind(sep, 0, target), text.find(sep, target)) if c >= 0]
        for cut in sorted(cuts, key=lambda c: abs(c - target)):
            train, val = text[:cut], text[cut + len(sep):]
            if train.strip() and val.strip():
                return Corpus(path.stem, train, val)
    raise DataError(f"{path}: no paragraph or line boundary to split train from val at; "
                    "give a folder with train.txt and val.txt instead")


def _wikitext2(path: Path) -> Corpus:
    """WikiText-2 raw: ``root`` holds wiki.train.raw and wiki.valid.raw, or a wikitext-2-raw/ folder that does."""
    if not (path / WIKITEXT2_FILES[0]).is_file() and (path / "wikitext-2-raw").is_dir():
        path = path / "wikitext-2-raw"
    missing = [f for f in WIKITEXT2_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; data.source=wikitext2 expects "
                        f"{' and '.join(WIKITEXT2_FILES)} there (or in its wikitext-2-raw/ folder)")
    return Corpus("wikitext2", _read(path / WIKITEXT2_FILES[0]), _read(path / WIKITEXT2_FILES[1]))


def _hf_disk(path: Path, val_fraction: float, text_column: str) -> Corpus:
    """A ``datasets.save_to_disk`` folder: a DatasetDict with train and validation (valid, test) splits,
    or one Dataset whose last ``val_fraction`` of the rows become val."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a dataset saved by datasets.save_to_disk ({_one_line(err)})") from None
    if isinstance(data, datasets.DatasetDict):
        val_split = next((s for s in VAL_SPLITS if s in data), None)
        if "train" not in data or val_split is None:
            raise DataError(f"{path}: splits {sorted(data)}; expected train and one of {', '.join(VAL_SPLITS)}")
        return Corpus(path.name, _rows(data["train"], text_column, path, "train"),
                      _rows(data[val_split], text_column, path, val_split))
    _check_column(data, text_column, path, "the dataset")
    n = len(data)
    n_val = round(n * val_fraction)
    if n < 2 or not 0 < n_val < n:
        raise DataError(f"{path}: {n} rows cannot be split by data.val_fraction={val_fraction}; "
                        "save a DatasetDict with train and validation splits")
    return Corpus(path.name, _rows(data.select(range(n - n_val)), text_column, path, "train"),
                  _rows(data.select(range(n - n_val, n)), text_column, path, "val"))


def _check_column(data: Any, column: str, path: Path, split: str) -> None:
    if column not in data.column_names:
        raise DataError(f"{path}: {split} has no column data.text_column={column!r}; its columns: {data.column_names}")
    dtype = getattr(data.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"{path}: {split} column {column!r} holds {data.features[column]}, not text")


def _rows(data: Any, column: str, path: Path, split: str) -> str:
    """The rows of ``column`` joined by a blank line (a missing row counts as empty)."""
    _check_column(data, column, path, split)
    text = SEPARATOR.join(t or "" for t in data[column])
    if not text.strip():
        raise DataError(f"{path}: split {split} holds no text in column {column!r}")
    return text


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def token_ids(text: str, tokenizer: Any, *, progress: bool = False, chunk_chars: int = 1 << 22) -> Tensor:
    """The token ids of ``text`` (1-D int64), without special tokens (no BOS/EOS anywhere): the text is
    one stream, later cut into blocks.

    Texts up to ``chunk_chars`` characters are tokenized in one call (exactly as a whole-text tokenization,
    e.g. WikiText-2 val); longer ones in pieces cut just before the last whitespace character that
    precedes a paragraph, which byte-level BPE (GPT-2's pre-tokenizer) splits there anyway. A tokenizer
    that adds a prefix space to every input (SentencePiece's ``add_dummy_prefix``) may differ there by
    one token per piece. The "longer than the maximum sequence length" warning is turned off (verbose=False):
    the model never sees the stream whole. ``progress`` shows a tqdm bar over the characters.
    """
    from tqdm import tqdm

    pieces = []
    with tqdm(total=len(text), unit="char", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for a, b in _pieces(text, chunk_chars):
            enc = tokenizer(text[a:b], add_special_tokens=False, verbose=False,
                            return_attention_mask=False, return_token_type_ids=False)
            pieces.append(torch.tensor(enc["input_ids"], dtype=torch.int64))
            bar.update(b - a)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def _pieces(text: str, chunk_chars: int) -> Iterator[tuple[int, int]]:
    """(start, end) character ranges of about ``chunk_chars``; each cut sits before the last whitespace
    character that leads into the next paragraph (the whole text where it has no paragraph after a chunk)."""
    start, n = 0, len(text)
    while n - start > chunk_chars:
        sep = text.find(SEPARATOR, start + chunk_chars)
        if sep < 0:
            break
        k = sep
        while k < n and text[k].isspace():
            k += 1
        if k == n:
            break
        yield start, k - 1
        start = k - 1
    yield start, n


class PackedSequences(torch.utils.data.Dataset):
    """Non-overlapping blocks of ``seq_len`` tokens of one id stream; the tail that fills no block is dropped."""

    def __init__(self, ids: Tensor, seq_len: int, name: str = "the text") -> None:
        require(isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 2, "data.seq_len",
                seq_len, "an integer >= 2")
        if ids.dim() != 1:
            raise DataError(f"{name}: token ids must be 1-D, got shape {tuple(ids.shape)}")
        n = ids.numel() // seq_len
        if n == 0:
            raise DataError(f"{name}: {ids.numel()} tokens make no block of data.seq_len={seq_len} tokens; "
                            f"it needs at least {seq_len} tokens (or a smaller data.seq_len)")
        self.seq_len = seq_len
        self.blocks = ids[: n * seq_len].long().reshape(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.blocks[index]


def _gather(dataset: Any, index: Tensor) -> Tensor:
    if isinstance(dataset, PackedSequences):
        return dataset.blocks[index]
    return torch.stack([torch.as_tensor(dataset[i]) for i in index.tolist()])


class StepBatches:
    """The batch of each optimizer step, a pure function of (seed, step): a resume continues exactly.

    The blocks form an endless stream of passes, pass p a ``torch.randperm`` seeded with ``seed + p``;
    step s takes positions [s * global_batch, (s + 1) * global_batch) of it, and rank r its r-th
    contiguous slice of ``global_batch // world``. At most two permutations are kept in memory.
    """

    def __init__(self, dataset: Any, global_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        require(isinstance(global_batch, int) and global_batch >= 1, "data.batch_size", global_batch,
                "a positive integer (the global batch, over all ranks)")
        if global_batch % world:
            raise ConfigError(f"data.batch_size={global_batch} is not allowed; the global batch must divide "
                              f"by the {world} ranks")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.dataset, self.global_batch, self.seed = dataset, global_batch, seed
        self.rank, self.world, self.n = rank, world, len(dataset)
        if self.n == 0:
            raise DataError("the training set holds no sequences")
        self._perms: dict[int, Tensor] = {}

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world

    def passes(self, step: int) -> float:
        """How many passes over the training blocks the steps before ``step`` made (epochs)."""
        return step * self.global_batch / self.n

    def _perm(self, p: int) -> Tensor:
        if p not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed + p)
            self._perms[p] = torch.randperm(self.n, generator=g)
        return self._perms[p]

    def indices(self, step: int) -> Tensor:
        """This rank's block indices for ``step``."""
        if step < 0:
            raise ValueError(f"step {step} < 0")
        start = step * self.global_batch + self.rank * self.local_batch
        pos = torch.arange(start, start + self.local_batch)
        passes, offsets = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for p in passes.unique().tolist():
            sel = passes == p
            out[sel] = self._perm(p)[offsets[sel]]
        return out

    def batch(self, step: int) -> Tensor:
        """This rank's batch of ``step``: a LongTensor (global_batch // world, seq_len)."""
        return _gather(self.dataset, self.indices(step))

    def iterate(self, start: int = 0) -> Iterator[Tensor]:
        """The batches of steps start, start + 1, ... (endless)."""
        step = start
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[Tensor]:
        return self.iterate(0)


def calibration_batches(dataset: Any, sequences: int, batch_size: int, seed: int = 0) -> list[Tensor]:
    """The first ``sequences`` blocks of a fixed permutation (its own seed stream, not the training order),
    in batches of ``batch_size``: the calibration set of the one-shot pruners."""
    require(isinstance(sequences, int) and sequences >= 1, "calibration sequences", sequences, "a positive integer")
    require(isinstance(batch_size, int) and batch_size >= 1, "calibration batch_size", batch_size,
            "a positive integer")
    n = len(dataset)
    if sequences > n:
        log.warning("calibration: %d sequences asked, the training set has %d; using all %d", sequences, n, n)
        sequences = n
    # crc32 of a label, not seed + p: never one of the training passes' permutations
    g = torch.Generator().manual_seed(zlib.crc32(f"lbc.lm.calibration:{seed}".encode()))
    index = torch.randperm(n, generator=g)[:sequences]
    return [_gather(dataset, chunk) for chunk in index.split(batch_size)]

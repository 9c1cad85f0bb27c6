"""lbc/lm/data.py: corpora from every source, their one-line errors, packed blocks, step batches, calibration."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zlib

import pytest
import torch

from lbc.errors import ConfigError, DataError
from lbc.lm.data import (
    Corpus,
    PackedSequences,
    StepBatches,
    calibration_batches,
    load_corpus,
    token_ids,
)
from lbc.lm.tokenizers import byte_tokenizer
from tests.helpers import ROOT

PARAGRAPHS = [f"Paragraph {i}: " + " ".join(f"word{i}_{j}" for j in range(3 + i % 4)) + "." for i in range(40)]


def split_of(corpus: Corpus, topics: dict[str, str]) -> set[str]:
    """The topics in val, checking that the corpus is exactly the sorted topics of each side, joined."""
    val = {k for k, doc in topics.items() if doc in corpus.val and doc not in corpus.train}
    assert corpus.train == "\n\n".join(topics[k] for k in sorted(topics) if k not in val)
    assert corpus.val == "\n\n".join(topics[k] for k in sorted(topics) if k in val)
    return val


# --- pydoc topics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_pydoc_split_is_disjoint_by_topic_and_near_the_fraction(fraction):
    from pydoc_data.topics import topics

    corpus = load_corpus("pydoc_topics", val_fraction=fraction)
    val = split_of(corpus, topics)
    assert 0 < len(val) < len(topics)
    share = sum(len(topics[k]) for k in val) / sum(map(len, topics.values()))
    assert abs(share - fraction) < 0.02
    assert abs(len(corpus.val) / (len(corpus.train) + len(corpus.val)) - fraction) < 0.02


def test_pydoc_split_is_the_same_in_another_python_process():
    """No hash(): a process with another hash seed splits the same way (lbc/__init__ is skipped: it is slow)."""
    code = ("import sys, types, zlib; pkg = types.ModuleType('lbc'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['lbc'] = pkg; from lbc.lm.data import load_corpus; "
            "print(zlib.crc32(load_corpus('pydoc_topics').val.encode()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "lbc")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert int(out) == zlib.crc32(load_corpus("pydoc_topics").val.encode())


def test_pydoc_split_does_not_depend_on_the_topics_order(monkeypatch):
    import pydoc_data.topics

    corpus = load_corpus("pydoc_topics")
    monkeypatch.setattr(pydoc_data.topics, "topics", dict(reversed(list(pydoc_data.topics.topics.items()))))
    assert load_corpus("pydoc_topics") == corpus


# --- file sources -------------------------------------------------------------------------------------

def test_text_file_splits_at_a_paragraph_boundary(tmp_path):
    text = "\n\n".join(PARAGRAPHS)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus("text", str(path), val_fraction=0.25)
    assert corpus.train + "\n\n" + corpus.val == text
    assert corpus.val.split("\n\n")[0] in PARAGRAPHS and corpus.train.split("\n\n")[-1] in PARAGRAPHS
    longest = max(map(len, PARAGRAPHS)) + 2
    assert abs(len(corpus.val) - 0.25 * len(text)) <= longest


def test_text_file_without_paragraphs_splits_at_a_line(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(PARAGRAPHS), encoding="utf-8")
    corpus = load_corpus("text", str(path), val_fraction=0.5)
    assert corpus.train + "\n" + corpus.val == path.read_text()
    assert corpus.val.split("\n")[0] in PARAGRAPHS


@pytest.mark.parametrize("val_name", ["val.txt", "valid.txt", "validation.txt"])
def test_text_folder_reads_train_and_val(tmp_path, val_name):
    (tmp_path / "train.txt").write_text("the train text\n", encoding="utf-8")
    (tmp_path / val_name).write_text("the val text ü\n", encoding="utf-8")
    corpus = load_corpus("text", str(tmp_path))
    assert (corpus.train, corpus.val) == ("the train text\n", "the val text ü\n")


@pytest.mark.parametrize("nested", [False, True])
def test_wikitext2_layout(tmp_path, nested):
    folder = tmp_path / "wikitext-2-raw" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / "wiki.train.raw").write_text(" = Train = \n text a \n", encoding="utf-8")
    (folder / "wiki.valid.raw").write_text(" = Valid = \n text b \n", encoding="utf-8")
    (folder / "wiki.test.raw").write_text(" = Test = \n", encoding="utf-8")
    corpus = load_corpus("wikitext2", str(tmp_path))
    assert (corpus.name, corpus.train, corpus.val) == ("wikitext2", " = Train = \n text a \n", " = Valid = \n text b \n")


@pytest.mark.parametrize("val_split", ["validation", "valid", "test"])
def test_hf_disk_dataset_dict(tmp_path, val_split):
    datasets = pytest.importorskip("datasets")
    rows = {"train": ["", " = A = \n", " line one \n"], val_split: [" = B = \n", "", " line two \n"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"body": v, "n": list(range(len(v)))})
                          for k, v in rows.items()}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus("hf_disk", str(tmp_path / "ds"), text_column="body")
    assert corpus.train == "\n\n".join(rows["train"])
    assert corpus.val == "\n\n".join(rows[val_split])


def test_hf_disk_plain_dataset_splits_by_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i}" for i in range(10)]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus("hf_disk", str(tmp_path / "ds"), val_fraction=0.3)
    assert corpus.train == "\n\n".join(rows[:7]) and corpus.val == "\n\n".join(rows[7:])


# --- one-line errors ----------------------------------------------------------------------------------

def _save(path, data):
    data.save_to_disk(str(path))
    return str(path)


def error_cases(tmp_path):
    """(name, call, error type, text the message must name)."""
    datasets = pytest.importorskip("datasets")
    Dataset, DatasetDict = datasets.Dataset, datasets.DatasetDict
    (tmp_path / "empty.txt").write_text("  \n\n ", encoding="utf-8")
    (tmp_path / "one.txt").write_text("no boundary at all", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n\nb".encode("latin-1"))
    (tmp_path / "only_train").mkdir()
    (tmp_path / "only_train" / "train.txt").write_text("a", encoding="utf-8")
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "wiki.train.raw").write_text("a", encoding="utf-8")
    (tmp_path / "not_a_dataset").mkdir()
    no_col = _save(tmp_path / "no_col", DatasetDict(train=Dataset.from_dict({"a": ["x"]}),
                                                    validation=Dataset.from_dict({"a": ["y"]})))
    no_val = _save(tmp_path / "no_val", DatasetDict(train=Dataset.from_dict({"text": ["x"]})))
    empty_val = _save(tmp_path / "empty_val", DatasetDict(train=Dataset.from_dict({"text": ["x"]}),
                                                          validation=Dataset.from_dict({"text": ["", " "]})))
    not_text = _save(tmp_path / "not_text", DatasetDict(train=Dataset.from_dict({"text": [1]}),
                                                        validation=Dataset.from_dict({"text": [2]})))
    one_row = _save(tmp_path / "one_row", Dataset.from_dict({"text": ["x"]}))
    missing = tmp_path / "missing.txt"
    return [
        ("source", lambda: load_corpus("c4"), ConfigError, "data.source"),
        ("fraction0", lambda: load_corpus("pydoc_topics", val_fraction=0.0), ConfigError, "data.val_fraction"),
        ("fraction1", lambda: load_corpus("pydoc_topics", val_fraction=1.5), ConfigError, "data.val_fraction"),
        ("no_root", lambda: load_corpus("text"), ConfigError, "data.root"),
        ("missing", lambda: load_corpus("text", str(missing)), DataError, str(missing)),
        ("empty", lambda: load_corpus("text", str(tmp_path / "empty.txt")), DataError, "empty.txt"),
        ("no_cut", lambda: load_corpus("text", str(tmp_path / "one.txt")), DataError, "one.txt"),
        ("latin1", lambda: load_corpus("text", str(tmp_path / "latin1.txt")), DataError, "latin1.txt"),
        ("no_val_file", lambda: load_corpus("text", str(tmp_path / "only_train")), DataError, "val.txt"),
        ("wiki", lambda: load_corpus("wikitext2", str(tmp_path / "wiki")), DataError, "wiki.valid.raw"),
        ("wiki_missing", lambda: load_corpus("wikitext2", str(tmp_path / "nowiki")), DataError, "nowiki"),
        ("not_dataset", lambda: load_corpus("hf_disk", str(tmp_path / "not_a_dataset")), DataError, "not_a_dataset"),
        ("no_column", lambda: load_corpus("hf_disk", no_col), DataError, "['a']"),
        ("no_val_split", lambda: load_corpus("hf_disk", no_val), DataError, "validation"),
        ("empty_split", lambda: load_corpus("hf_disk", empty_val), DataError, "validation"),
        ("not_text", lambda: load_corpus("hf_disk", not_text), DataError, "not text"),
        ("one_row", lambda: load_corpus("hf_disk", one_row), DataError, "data.val_fraction"),
        ("few_tokens", lambda: PackedSequences(torch.arange(7), 8, name="val.txt"), DataError, "7 tokens"),
        ("seq_len", lambda: PackedSequences(torch.arange(7), 0), ConfigError, "data.seq_len"),
        ("batch", lambda: StepBatches(PackedSequences(torch.arange(40), 4), 6, 0, world=4), ConfigError,
         "data.batch_size"),
    ]


def test_every_error_is_one_line_and_names_its_file_or_key(tmp_path):
    for name, call, kind, named in error_cases(tmp_path):
        with pytest.raises(kind) as err:
            call()
        text = str(err.value)
        assert "\n" not in text, (name, text)
        assert named in text, (name, text)
        if name == "few_tokens":
            assert "data.seq_len=8" in text and "val.txt" in text


# --- token ids ----------------------------------------------------------------------------------------

def test_token_ids_are_the_bytes_without_special_tokens_and_chunking_changes_nothing(caplog):
    tok = byte_tokenizer()
    tok.model_max_length = 16  # the warning the whole-stream tokenization must not give
    text = "\n\n".join(PARAGRAPHS) + "\n\n  ünïcode  \n\n\n tail"
    expected = [tok.convert_tokens_to_ids(t) for t in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)[0][0]]
    with caplog.at_level(logging.WARNING):
        whole = token_ids(text, tok)
        pieces = token_ids(text, tok, chunk_chars=50)
    assert whole.dtype == torch.int64 and whole.dim() == 1
    assert whole.numel() == len(text.encode("utf-8")) and whole[0].item() == expected[0]
    assert tok.eos_token_id not in whole.tolist()
    assert torch.equal(whole, pieces)
    assert tok.decode(pieces.tolist()) == text
    assert "longer than the specified maximum" not in caplog.text


def gpt2_like_tokenizer():
    """Byte-level BPE with GPT-2's pre-tokenizer regex and merges of newlines and spaces (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ċ", "Ċ"), ("Ġ", "Ġ"), ("Ġ", "P"), ("ĊĊ", "Ċ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_chunked_tokenization_equals_whole_text_for_byte_level_bpe():
    """The pieces are cut where GPT-2's pre-tokenizer splits anyway; a cut right after a blank line is not."""
    tok = gpt2_like_tokenizer()
    seps = ["\n\n", "\n\n\n", "\n\n ", "  \n\n  ", "\n\n\n\n"]
    text = "".join(f"Para {i} text" + seps[i % len(seps)] for i in range(30)) + "end"
    whole = token_ids(text, tok)
    for chunk_chars in (5, 17, 40):
        assert torch.equal(token_ids(text, tok, chunk_chars=chunk_chars), whole)
    naive = torch.cat([token_ids(piece, tok) for piece in re.split(r"(?<=\n\n)", text) if piece])
    assert not torch.equal(naive, whole)  # the test can tell a bad cut


# --- packed blocks and step batches -------------------------------------------------------------------

def test_packed_sequences_blocks_and_tail_drop():
    ds = PackedSequences(torch.arange(23), 5)
    assert len(ds) == 4
    for i in range(4):
        assert ds[i].shape == (5,) and ds[i].dtype == torch.int64
        assert torch.equal(ds[i], torch.arange(5 * i, 5 * i + 5))
    assert int(ds.blocks.max()) == 19  # tokens 20..22 fill no block


def blocks(n: int, seq_len: int = 3) -> PackedSequences:
    """Block i holds tokens 3i..3i+2: a batch's first column // 3 is its block indices."""
    return PackedSequences(torch.arange(n * seq_len), seq_len)


def test_step_batches_are_a_function_of_seed_and_step():
    ds = blocks(7)
    a, b = StepBatches(ds, 3, seed=5), StepBatches(ds, 3, seed=5)
    for step in (0, 4, 11, 2):
        assert a.batch(step).shape == (3, 3)
        assert torch.equal(a.batch(step), b.batch(step))
    other = StepBatches(ds, 3, seed=6)
    assert any(not torch.equal(a.batch(s), other.batch(s)) for s in range(5))


def test_resume_at_step_k_continues_the_uninterrupted_stream():
    ds = blocks(7)
    run = StepBatches(ds, 3, seed=1).iterate()
    uninterrupted = [next(run) for _ in range(12)]
    for k in (0, 3, 5, 9):
        resumed = StepBatches(ds, 3, seed=1).iterate(k)
        for step in range(k, 12):
            assert torch.equal(next(resumed), uninterrupted[step])


def test_each_pass_is_a_seeded_permutation_of_all_blocks():
    n, batch, seed = 7, 3, 11
    steps = StepBatches(blocks(n), batch, seed)
    stream = torch.cat([steps.batch(s)[:, 0] // 3 for s in range(n)])  # 21 positions = 3 passes
    for p in range(3):
        chunk = stream[p * n:(p + 1) * n]
        assert sorted(chunk.tolist()) == list(range(n))
        assert torch.equal(chunk, torch.randperm(n, generator=torch.Generator().manual_seed(seed + p)))


def test_batch_larger_than_the_data_spans_passes():
    steps = StepBatches(blocks(3), 8, seed=0)
    idx = steps.batch(0)[:, 0] // 3
    assert sorted(idx[:3].tolist()) == sorted(idx[3:6].tolist()) == [0, 1, 2]
    assert steps.passes(1) == 8 / 3


def test_rank_slices_concatenate_to_the_single_rank_batch():
    ds = blocks(10)
    whole = StepBatches(ds, 4, seed=3)
    ranks = [StepBatches(ds, 4, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(6):
        parts = [r.batch(step) for r in ranks]
        assert parts[0].shape == (2, 3)
        assert torch.equal(torch.cat(parts), whole.batch(step))


def test_any_dataset_of_tensors_gives_the_same_batches():
    ds = blocks(6)
    plain = [ds[i].clone() for i in range(len(ds))]
    assert torch.equal(StepBatches(plain, 4, seed=2).batch(3), StepBatches(ds, 4, seed=2).batch(3))


# --- calibration ---------------------------------------------------------------------------------------

def test_calibration_is_deterministic_and_not_the_training_order():
    ds = blocks(50)
    cal = calibration_batches(ds, 5, 2, seed=0)
    assert [b.shape for b in cal] == [(2, 3), (2, 3), (1, 3)]
    assert all(torch.equal(x, y) for x, y in zip(cal, calibration_batches(ds, 5, 2, seed=0), strict=True))
    idx = torch.cat(cal)[:, 0] // 3
    assert len(set(idx.tolist())) == 5
    for seed in range(3):  # whatever the training seed, the calibration set is not its first batch
        train_first = StepBatches(ds, 5, seed=seed).batch(0)[:, 0] // 3
        assert not torch.equal(idx, train_first)
    assert not torch.equal(idx, torch.cat(calibration_batches(ds, 5, 2, seed=1))[:, 0] // 3)
    # more sequences only extend the same permutation
    longer = torch.cat(calibration_batches(ds, 9, 4, seed=0))[:, 0] // 3
    assert torch.equal(longer[:5], idx)


def test_calibration_with_fewer_blocks_uses_them_all_and_warns(caplog):
    ds = blocks(4)
    with caplog.at_level(logging.WARNING, logger="lbc"):
        cal = calibration_batches(ds, 10, 3)
    assert sorted((torch.cat(cal)[:, 0] // 3).tolist()) == [0, 1, 2, 3]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "lbc"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage() and "10" in warnings[0].getMessage()

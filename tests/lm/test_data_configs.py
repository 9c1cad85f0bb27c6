"""Every text data config (task=lm) composes and reads its source through lbc.lm.data.load_corpus."""

from __future__ import annotations

import pytest

from lbc.config import SCHEMAS, TextDataConfig
from lbc.lm.data import load_corpus
from tests.helpers import CONFIGS, compose_config

OPTIONS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml") if SCHEMAS["data"].get(p.stem) is TextDataConfig)
PARAGRAPHS = "\n\n".join(f"Paragraph {i} says something about topic {i % 7}." for i in range(40))


def layout(option: str, tmp_path) -> str | None:
    """A data.root in the option's layout, written into ``tmp_path`` (None: a built-in source)."""
    if option == "text":
        (tmp_path / "train.txt").write_text(PARAGRAPHS)
        (tmp_path / "val.txt").write_text("A held-out paragraph.\n\nAnother one.")
    elif option == "wikitext2":
        (tmp_path / "wiki.train.raw").write_text(PARAGRAPHS)
        (tmp_path / "wiki.valid.raw").write_text(" = Valid = \n\n A held-out paragraph.")
    elif option == "hf_disk":
        datasets = pytest.importorskip("datasets")
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": PARAGRAPHS.split("\n\n")}),
                              "validation": datasets.Dataset.from_dict({"text": ["held out", "again"]})}
                             ).save_to_disk(str(tmp_path / "ds"))
        return str(tmp_path / "ds")
    else:
        return None
    return str(tmp_path)


def test_the_text_options_are_the_documented_sources():
    assert OPTIONS == ["hf_disk", "pydoc_topics", "text", "wikitext2"]


@pytest.mark.parametrize("option", OPTIONS)
def test_text_config_reads_its_source(option, tmp_path):
    root = layout(option, tmp_path)
    cfg = compose_config(["task=lm", f"data={option}", "run_dir=x"] + ([f"data.root={root}"] if root else []))
    corpus = load_corpus(cfg.data.source, cfg.data.root, val_fraction=cfg.data.val_fraction,
                         text_column=cfg.data.text_column)
    assert corpus.train and corpus.val and corpus.val not in corpus.train
    if root is not None:
        assert "held" in corpus.val.lower() and "Paragraph 39" in corpus.train

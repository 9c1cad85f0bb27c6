"""``<run_dir>/metrics.jsonl``: one schema, one writer (:class:`MetricsRecord`), one reader (:func:`read_metrics`).

The schema, the same for every task: one JSON object per line, appended (and flushed) after each
evaluation (classification: every epoch; detection: every validation). Keys:

- ``epoch`` (int): epochs completed when the evaluation ran;
- ``step`` (int): optimizer steps completed in the whole run (all epochs so far);
- the task's metrics under their plain names. Classification: ``train_loss``, ``lr``,
  ``train_images``, ``train_skipped``, ``val_loss``, ``top1``, ``top5``, ``val_images``,
  ``val_skipped``, ``ema_top1`` (with EMA), ``seconds``, ``skipped``. Detection: ``train_loss`` (mean
  of mmengine's ``train/loss`` over the iterations since the last validation), ``lr`` (the last
  iteration's, first parameter group), ``seconds`` (since the last validation, it included), and mmdet's
  validation metrics as mmengine names them (``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ...,
  ``coco/segm_mAP`` for Mask R-CNN). Language models: ``tokens``, ``train_loss``, ``lr``, ``seconds``,
  ``train_tokens_per_s``, ``ppl``, ``val_loss``, ``tokens_per_s``, ...;
- the sparsity method's report scalars as ``sparsity/<name>`` (``sparsity/density``,
  ``sparsity/exact_nm``, ``sparsity/train_flops_ratio``, ... as the method reports them).

NaN and inf are written as ``null`` (the line stays valid JSON); numpy and torch scalars as numbers.

The console and ``train.log`` get one line per record, built from the record as written
(:func:`progress_line`, :data:`LINE_FIELDS`: the same function for every task), so a run cannot print
one thing and record another: ``epoch 3/15: loss 0.3178  top-1 26.94  top-5 87.50  lr 9.05e-02  density
0.755  2.1s`` (classification), ``epoch 3/6: loss 1.2345  bbox_mAP 0.015  segm_mAP 0.025  lr 2.00e-02
density 0.551  41.2s`` (detection), ``step 20/30: loss 2.9120  ppl 18.04  lr 3.00e-03  density 0.500
1.2s`` (language models).

Reading: a missing file is no record yet (``[]``). A line that is not a JSON object with an integer
``epoch`` raises :class:`MetricsError` (one line naming it, e.g. ``metrics.jsonl line 3 is not JSON``)
rather than being skipped: a table built from a quietly shortened record would be wrong without
saying so. The writer never leaves such a line, except a torn last line when the process was killed
while appending; the resume that follows drops it (:meth:`MetricsRecord.truncate_after`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lbc.io import atomic_write

METRICS_FILE = "metrics.jsonl"

__all__ = ["LINE_FIELDS", "METRICS_FILE", "MetricsError", "MetricsRecord", "last_metrics", "progress_line",
           "read_metrics", "sparsity_scalars"]

# The progress line's fields, in the order they print: (record key, label, format). One table for every task: a
# line shows what its record holds, a key the record lacks is left out and a null (NaN, inf) prints as n/a.
# ``seconds`` follows them as ``<value>s``.
LINE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("train_loss", "loss", ".4f"),
    ("top1", "top-1", ".2f"),
    ("top5", "top-5", ".2f"),
    ("coco/bbox_mAP", "bbox_mAP", ".3f"),
    ("coco/segm_mAP", "segm_mAP", ".3f"),
    ("ppl", "ppl", ".2f"),
    ("lr", "lr", ".2e"),
    ("sparsity/density", "density", ".3f"),
)


class MetricsError(ValueError):
    """A ``metrics.jsonl`` line that is not a record; ``str()`` is one line naming the line."""


def sparsity_scalars(method: Any) -> dict[str, float]:
    """The sparsity method's report scalars under their record keys, ``sparsity/<name>``."""
    return {f"sparsity/{k}": float(v) for k, v in method.report().get("scalars", {}).items()}


def _plain(value: Any) -> Any:
    """A metric as a JSON value: numpy / torch scalars to Python numbers, NaN and inf to None."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _shown(value: Any, spec: str) -> str:
    """``value`` as ``format(value, spec)``; ``n/a`` for a null or anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a"
    return format(value, spec)


def progress_line(record: Mapping[str, Any], total: int, unit: str = "epoch") -> str:
    """``<unit> <record[unit]>/<total>: loss 0.3178  top-1 26.94  ...  density 0.755  2.1s``: the one line a
    run logs per evaluation, from the record as :meth:`MetricsRecord.append` wrote it (:data:`LINE_FIELDS`).

    ``unit``: ``epoch`` (classification, detection) or ``step`` (language models, whose time is steps).
    """
    parts = [f"{label} {_shown(record[key], spec)}" for key, label, spec in LINE_FIELDS if key in record]
    if "seconds" in record:
        parts.append(f"{_shown(record['seconds'], '.1f')}s")
    return f"{unit} {record[unit]}/{total}: " + "  ".join(parts)


def _parse(text: str) -> list[tuple[int, str, dict[str, Any] | str]]:
    """(1-based line number, the line, its record or why it is none) for every non-blank line."""
    out: list[tuple[int, str, dict[str, Any] | str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            out.append((number, line, "is not JSON"))
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        ok = isinstance(epoch, int) and not isinstance(epoch, bool)
        out.append((number, line, record if ok else "has no integer 'epoch'"))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` in order; ``[]`` if there is no such file.

    Raises :class:`MetricsError` at the first line that is not JSON or has no integer ``epoch``.
    """
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for number, _, record in _parse(text):
        if isinstance(record, str):
            raise MetricsError(f"{METRICS_FILE} line {number} {record}")
        records.append(record)
    return records


def last_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The last record of ``<run_dir>/metrics.jsonl`` (``{}`` when there is none)."""
    records = read_metrics(run_dir)
    return records[-1] if records else {}


class MetricsRecord:
    """Appends records to ``<run_dir>/metrics.jsonl`` when ``enabled`` (rank 0); a no-op otherwise.

    ``tensorboard``: also write TensorBoard scalars into ``run_dir`` (classification; mmengine keeps
    detection's own): each record's values as ``epoch/<key>`` at its epoch, and :meth:`scalars`.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only by a run that writes events

            self.tb = SummaryWriter(log_dir=str(run_dir))

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record (it must carry ``epoch`` and ``step``) as one flushed line; returns the record as
        written (plain JSON values: what :func:`progress_line` prints), also when the writer is disabled."""
        clean = {k: _plain(v) for k, v in record.items()}
        if not self.enabled:
            return clean
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            self.scalars({k: v for k, v in clean.items() if k not in ("epoch", "step")}, clean["epoch"], prefix="epoch/")
            self.tb.flush()
        return clean

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """TensorBoard scalars ``<prefix><name>`` at ``step`` (numbers only; nothing without TensorBoard)."""
        if self.tb is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}{name}", value, step)

    def truncate_after(self, epoch: int | None, step: int | None = None) -> None:
        """On resume from a checkpoint after ``epoch`` epochs (or, a task whose checkpoints fall inside an
        epoch, after ``step`` steps): drop the records written after that checkpoint and any line that is not
        a record (a torn line from a killed append)."""
        if not self.enabled or not self.path.is_file():
            return
        lines = _parse(self.path.read_text(encoding="utf-8"))

        def kept(r: dict[str, Any]) -> bool:
            if step is not None:
                return isinstance(r.get("step"), int) and r["step"] <= step
            return epoch is None or r["epoch"] <= epoch

        text = "".join(line + "\n" for _, line, r in lines if isinstance(r, dict) and kept(r))
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

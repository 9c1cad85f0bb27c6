"""``<run_dir>/metrics.jsonl``: one schema, one writer (:class:`MetricsRecord`), one reader (:func:`read_metrics`).

The schema, the same for every task: one JSON object per line, appended (and flushed) after each
evaluation (classification: every epoch; detection: every validation). Keys:

- ``epoch`` (int): epochs completed when the evaluation ran;
- ``step`` (int): optimizer steps completed in the whole run (all epochs so far);
- the task's metrics under their plain names. Classification: ``train_loss``, ``lr``,
  ``train_images``, ``train_skipped``, ``val_loss``, ``top1``, ``top5``, ``val_images``,
  ``val_skipped``, ``ema_top1`` (with EMA), ``seconds``, ``skipped``. Detection: mmdet's validation
  metrics as mmengine names them (``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ..., ``coco/segm_mAP`` for
  Mask R-CNN);
- the sparsity method's report scalars as ``sparsity/<name>`` (``sparsity/density``,
  ``sparsity/exact_nm``, ``sparsity/train_flops_ratio``, ... as the method reports them).

NaN and inf are written as ``null`` (the line stays valid JSON); numpy and torch scalars as numbers.

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

__all__ = ["METRICS_FILE", "MetricsError", "MetricsRecord", "last_metrics", "read_metrics", "sparsity_scalars"]


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

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record (it must carry ``epoch`` and ``step``) as one flushed line."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            self.scalars({k: v for k, v in clean.items() if k not in ("epoch", "step")}, clean["epoch"], prefix="epoch/")
            self.tb.flush()

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

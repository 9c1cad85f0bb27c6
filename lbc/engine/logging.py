"""Run-directory logging on rank 0: TensorBoard scalars and ``metrics.jsonl`` (one JSON object per epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    """Writes to ``run_dir`` when ``enabled`` (rank 0); every call is a no-op otherwise."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.tb = SummaryWriter(log_dir=str(run_dir)) if enabled else None

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.tb is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}{name}", value, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (NaN/inf become null so the line stays valid JSON)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop lines for epochs > ``epoch`` (written after the checkpoint we resume from)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("epoch", -1) <= epoch]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

"""When a run writes its resumable checkpoint inside an epoch (``trainer.checkpoint_every``), for every task:
:func:`checkpoint_cadence` reads the value (validated with the config), :class:`StepCheckpoints` says when
one is due (classification's ``last.pt``, detection's ``iter_<n>.pth``)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from lbc.errors import require
from lbc.run.signals import AGREE_EVERY

if TYPE_CHECKING:  # the config modules import this one: torch only when a run asks
    from lbc.run.signals import GracefulStop

__all__ = ["StepCheckpoints", "checkpoint_cadence"]

_MINUTES = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*min")


def checkpoint_cadence(value: Any) -> tuple[int | None, float | None]:
    """``trainer.checkpoint_every`` as (steps, minutes), at most one of them set: ``200`` is every 200
    optimizer steps, ``"10min"`` every 10 minutes of training (``"0.5min"``: 30 s), null never inside an epoch."""
    if value is None:
        return None, None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, None
    match = _MINUTES.fullmatch(value.strip()) if isinstance(value, str) else None
    if match and float(match.group(1)) > 0:
        return None, float(match.group(1))
    require(False, "trainer.checkpoint_every", value,
            "use a number of steps (e.g. 200), minutes of training (e.g. 10min), or null (epoch ends only)")
    raise AssertionError  # require raised


class StepCheckpoints:
    """When to write ``last.pt`` inside an epoch (``trainer.checkpoint_every``): every N steps, or once N
    minutes of training have passed since the last write. Under torchrun the ranks' clocks differ, so
    the minutes are compared every :data:`~lbc.run.signals.AGREE_EVERY` steps and agreed on (any rank
    due: all write), keeping the collective ``Training.state`` matched."""

    def __init__(self, every: Any, stop: GracefulStop) -> None:
        self.steps, minutes = checkpoint_cadence(every)
        self.seconds = None if minutes is None else minutes * 60.0
        self.stop, self.since = stop, time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.steps is not None:
            return global_step % self.steps == 0
        if self.seconds is None:
            return False
        late = time.monotonic() - self.since >= self.seconds
        from lbc.run import distributed

        if not distributed.is_distributed():
            return late
        return global_step % AGREE_EVERY == 0 and self.stop.any_rank(late)

    def written(self) -> None:
        self.since = time.monotonic()

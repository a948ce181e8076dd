"""Counters for the councils this process has run: how many, how they ended, how long they took.

Kept in memory (a restart starts from zero) and read by ``/health``. Nothing here imports
``discord``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


def percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100), or None without values."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 < p <= 100:
        raise ValueError("p must be in (0, 100]")
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass
class CouncilCounters:
    """What ``/health`` reports about the councils served since start-up.

    ``served`` counts rounds that ended with a synthesis, ``failed`` rounds that ended without one
    (every fighter failed, the synthesis failed, or the bot hit an error), ``interrupted`` rounds
    cut short by a shutdown. Wall times of the last ``window`` finished rounds feed the percentiles.
    """

    window: int = 500
    clock: Callable[[], float] = time.monotonic
    served: int = 0
    failed: int = 0
    interrupted: int = 0
    started_at: float = field(init=False)
    _walls: deque[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        self._walls = deque(maxlen=self.window)

    def record(self, *, ok: bool, wall_s: float | None) -> None:
        """One round finished (with or without a synthesis)."""
        if ok:
            self.served += 1
        else:
            self.failed += 1
        if wall_s is not None:
            self._walls.append(wall_s)

    def record_interrupted(self) -> None:
        self.interrupted += 1

    @property
    def uptime_s(self) -> float:
        return self.clock() - self.started_at

    @property
    def p50_s(self) -> float | None:
        return percentile(self._walls, 50)

    @property
    def p95_s(self) -> float | None:
        return percentile(self._walls, 95)

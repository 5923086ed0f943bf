"""Time as a dependency, so queue logic can be tested without sleeping."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    timer_slack_s: float
    """How late ``sleep`` may wake on this clock; deadlines meant as upper
    bounds are armed this much early."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def sleep(self, delay_s: float) -> None: ...

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` once ``delay_s`` has passed, unless cancelled first (no task, no coroutine)."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    # asyncio's epoll/poll selectors round every timeout up to a whole
    # millisecond, so a sleep can end up to 1 ms late.
    timer_slack_s = 0.001

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay_s, callback)


class MeanGap:
    """A moving mean (EWMA) of the gaps between events on one clock: infinite until a gap is known.

    ``since_s``: when counting starts (the first event's gap is from then); -inf, the default, makes
    the first event only a start, so the second gives the first gap.
    """

    __slots__ = ("weight", "mean_s", "_last_s")

    def __init__(self, weight: float, since_s: float = -math.inf) -> None:
        self.weight = weight
        self.mean_s = math.inf
        self._last_s = since_s

    def note(self, now_s: float) -> None:
        """An event at ``now_s``."""
        gap_s, self._last_s = now_s - self._last_s, now_s
        self.mean_s = gap_s if self.mean_s == math.inf else self.mean_s + self.weight * (gap_s - self.mean_s)

"""Time as a dependency, so queue logic can be tested without sleeping."""

from __future__ import annotations

import asyncio
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

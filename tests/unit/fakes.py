"""Test doubles shared by the unit tests: a manual clock and loop helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

SETTLE_ROUNDS = 20


async def settle(rounds: int = SETTLE_ROUNDS) -> None:
    """Let every ready task on the event loop run for ``rounds`` iterations, without real time passing."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """A ``flotilla.common.clock.Clock`` whose time moves only when a test says so.

    ``sleep(d)`` parks the caller until ``advance`` moves ``now()`` to at
    least the wake time (``now() + d`` at the time of the call).
    """

    timer_slack_s = 0.0  # this clock wakes sleepers exactly on time

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._timers: list[_FakeTimer] = []

    def now(self) -> float:
        return self._now

    def set(self, now_s: float) -> None:
        """Jump to ``now_s`` without waking sleepers (use ``advance`` to wake them)."""
        self._now = now_s

    async def sleep(self, delay_s: float) -> None:
        if delay_s <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (self._now + delay_s, waiter)
        self._sleepers.append(entry)
        try:
            await waiter
        finally:
            self._sleepers.remove(entry)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> _FakeTimer:
        timer = _FakeTimer(self._now + max(delay_s, 0.0), callback)
        self._timers.append(timer)
        return timer

    @property
    def timers(self) -> int:
        """How many ``call_later`` callbacks are armed and not cancelled."""
        return sum(1 for t in self._timers if not t.cancelled)

    @property
    def sleepers(self) -> int:
        """How many callers are parked in ``sleep`` right now."""
        return sum(1 for _, waiter in self._sleepers if not waiter.done())

    async def advance(self, delta_s: float) -> None:
        """Move time forward, wake every sleeper whose time has come, and let the loop run."""
        if delta_s < 0:
            raise ValueError("a monotonic clock does not go back")
        self._now += delta_s
        for wake_s, waiter in list(self._sleepers):
            if wake_s <= self._now and not waiter.done():
                waiter.set_result(None)
        for _ in range(1000):  # timers due now may arm more timers due now
            due = sorted((t for t in self._timers if t.when_s <= self._now), key=lambda t: t.when_s)
            if not due:
                break
            self._timers = [t for t in self._timers if t.when_s > self._now]
            for timer in due:
                if not timer.cancelled:
                    timer.callback()
        await settle()


class _FakeTimer:
    def __init__(self, when_s: float, callback: Callable[[], None]) -> None:
        self.when_s = when_s
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

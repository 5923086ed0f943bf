"""Simulated time for the fleet simulator: an asyncio event loop whose clock jumps.

``VirtualTimeLoop`` is an ordinary selector event loop except that
``time()`` reads a virtual clock, and when the loop has nothing ready it
does not block until its next timer: the clock jumps to that timer. So a
simulated day of ``asyncio.sleep``s, load times and drains runs as fast as
the code under it, and the order of events is the one real time would give.

Nothing in a simulation may wait on real I/O or threads: ``asyncio.to_thread``
(the controller reads its artifact store and saves its records through it)
runs inline on the loop's thread (``InlineExecutor``), so its result is ready
at once and no wall time leaks into simulated time. A loop with nothing ready
and no timer would wait for ever: that is a deadlock of the simulation and
raises ``SimulationStalled``.

``SimClock`` is the ``flotilla.common.clock.Clock`` the controller is given:
``now()`` and ``sleep`` on the loop's virtual time.
"""

from __future__ import annotations

import asyncio
import selectors
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from flotilla.common.clock import Timer

T = TypeVar("T")


class SimulationStalled(RuntimeError):
    """Every task waits and nothing is scheduled: the simulation can never move again."""


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; a wait for ``timeout`` seconds moves the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise SimulationStalled("every task waits and no timer is set: the simulation cannot go on")
        self._loop.virtual_s += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring)."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.virtual_s = start_s
        super().__init__(_JumpingSelector(self))
        self._clock_resolution = 1e-9
        self.set_default_executor(InlineExecutor())

    def time(self) -> float:
        return self.virtual_s

    def busy(self) -> bool:
        """Some callback other than the caller's is ready to run now, or a timer is due (the caller,
        a task, is not in the ready queue while it runs)."""
        # asyncio keeps its queues unannounced (typeshed leaves them out): this subclass reads its base's own.
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled")  # noqa: B009
        ready: deque[asyncio.Handle] = getattr(self, "_ready")  # noqa: B009
        return bool(ready) or (bool(scheduled) and scheduled[0].when() <= self.virtual_s)


async def settle() -> None:
    """Return once every task that can run without simulated time passing has run (on a ``VirtualTimeLoop``)."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop), "settle() runs on a VirtualTimeLoop"
    while loop.busy():
        await asyncio.sleep(0)


class InlineExecutor(ThreadPoolExecutor):
    """Runs each submitted call at once on the caller's thread (``asyncio.to_thread`` without a thread)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting coroutine, as a thread's would be
            future.set_exception(exc)
        return future


class SimClock:
    """The controller's clock in a simulation: the running loop's virtual time."""

    timer_slack_s = 0.0

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(max(delay_s, 0.0))

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(delay_s, 0.0), callback)


def run_simulated(main: Callable[[], Awaitable[T]], start_s: float = 0.0) -> T:
    """Run ``main()`` to completion on a fresh ``VirtualTimeLoop``; the loop is closed afterwards."""
    loop = VirtualTimeLoop(start_s)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

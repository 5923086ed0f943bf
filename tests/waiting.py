"""Waiting in tests: on a condition, polled until a deadline, never on a guessed sleep.

A sleep that guesses how long something takes passes on the machine it was tuned on and
fails on a slower one. Where the code under test sets an event or takes a clock, wait on
that; where it does neither (a real process, a thread, a socket), poll the condition that
says it happened with ``until``: it returns as soon as the condition holds and fails
with ``what`` once ``timeout_s`` has passed, so the timeout is a bound, not a guess.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

Condition = Callable[[], object]
"""A plain or async callable whose result (awaited, if it is awaitable) is truthy once the awaited
thing has happened."""

POLL_INTERVAL_S = 0.02


async def until(condition: Condition, timeout_s: float, what: str, *, interval_s: float = POLL_INTERVAL_S) -> float:
    """Seconds until ``condition()`` held, polled every ``interval_s`` on the event loop.

    Fails with ``what`` if it has not held after ``timeout_s``.
    """
    start = time.monotonic()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(interval_s)


def until_sync(condition: Callable[[], object], timeout_s: float, what: str, *, interval_s: float = POLL_INTERVAL_S) -> float:
    """``until`` for a test with no event loop: blocks the thread between looks."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)
    return time.monotonic() - start

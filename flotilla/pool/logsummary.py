"""Repeated failures, logged as counts per interval instead of once per call.

The first failure of a kind is logged at once (an operator sees the start
of an incident); the ones that follow within ``interval_s`` are counted and
logged as one line when the interval is over and the next one happens (or
on ``flush``): "... 7912 more in the last 10.0 s". A service whose
dependency is down for a minute writes a handful of lines, not one per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Window:
    started_s: float
    count: int = 0
    last_message: str = ""


class FailureSummary:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def note(self, key: str, message: str) -> None:
        """One failure of kind ``key`` (e.g. a replica's address); ``message`` says what failed."""
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.started_s >= self.interval_s:
            if window is not None:
                self._report(key, window, now)
            self._windows[key] = _Window(now)
            self.logger.log(self.level, "%s: %s", key, message)
            return
        window.count += 1
        window.last_message = message

    def flush(self) -> None:
        now = self.clock()
        for key, window in list(self._windows.items()):
            self._report(key, window, now)
        self._windows.clear()

    def _report(self, key: str, window: _Window, now: float) -> None:
        if window.count:
            self.logger.log(
                self.level, "%s: %d more failures in the last %.1f s (latest: %s)",
                key, window.count, now - window.started_s, window.last_message,
            )

"""Load generation: closed-loop concurrency and open-loop Poisson arrivals.

Both modes drive an async ``call()`` (one request) for a fixed duration and
record every request's latency and outcome. Closed loop: ``concurrency``
workers each send their next request as soon as the previous one answers
(throughput is what the system gives). Open loop: requests start at
exponentially distributed intervals with mean ``1 / rate_per_s``, whether or
not earlier ones have answered (latency shows queueing honestly).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from flotilla.errors import FlotillaError

Call = Callable[[], Awaitable[object]]


@dataclass
class LoadResult:
    """What one load point measured."""

    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    """Latency of each successful request."""
    errors: Counter[str] = field(default_factory=Counter)
    """Failed requests by status name."""

    @property
    def succeeded(self) -> int:
        return len(self.latencies_s)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput_per_s(self) -> float:
        return self.succeeded / self.duration_s if self.duration_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), percentile) * 1000.0)


async def _timed(call: Call) -> tuple[float, str | None]:
    """(latency in seconds, None) or (latency, status name) for one request."""
    start = time.perf_counter()
    try:
        await call()
    except FlotillaError as exc:
        return time.perf_counter() - start, exc.code.name
    except Exception as exc:  # a load test reports failures, it does not stop on them
        return time.perf_counter() - start, type(exc).__name__
    return time.perf_counter() - start, None


def _record(result: LoadResult, outcome: tuple[float, str | None]) -> None:
    latency_s, error = outcome
    if error is None:
        result.latencies_s.append(latency_s)
    else:
        result.errors[error] += 1


async def closed_loop(
    call: Call,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
    on_done: Callable[[], None] | None = None,
) -> LoadResult:
    """``concurrency`` workers, each with one request outstanding.

    The measured window is ``[warmup_s, warmup_s + duration_s)`` from the
    start: only requests that complete inside it are recorded, so neither
    the ramp-up nor the drain after the window (when the load is already
    stopping) counts.
    """
    measured = LoadResult(duration_s=duration_s)
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            outcome = await _timed(call)
            if measure_from <= time.perf_counter() < stop_at:
                _record(measured, outcome)
            if on_done is not None:
                on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return measured


async def open_loop(
    call: Call,
    *,
    rate_per_s: float,
    duration_s: float,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
) -> LoadResult:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s``; waits for stragglers."""
    rng = random.Random(seed)
    result = LoadResult(duration_s=duration_s)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    next_at = start

    async def one() -> None:
        _record(result, await _timed(call))
        if on_done is not None:
            on_done()

    while True:
        next_at += rng.expovariate(rate_per_s)
        if next_at - start >= duration_s:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return result

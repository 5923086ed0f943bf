"""The batcher's core: a request queue that releases batches.

A batch leaves the queue when it is full (``max_batch_size`` requests) or
when its oldest request has waited ``max_queue_delay_us``, whichever comes
first, and only while fewer than ``max_inflight_batches`` batches are out.
While every slot is busy requests keep queueing, so batches grow with load.

Each request owns one future. A batch's dispatch answers every live request
of the batch exactly once: its own result or error, or the batch's error
when the whole batch failed. Requests whose caller went away (cancelled) or
whose deadline passed while queued are dropped before dispatch; the latter
get DEADLINE_EXCEEDED. A full queue rejects at once with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flotilla.common.clock import Clock, MonotonicClock
from flotilla.config import BatchingSettings
from flotilla.errors import DeadlineExceeded, FlotillaError, QueueFull, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# dispatch(items, deadline_s) -> one result or FlotillaError per item, in order
Dispatch = Callable[[list[T], float | None], Awaitable[Sequence[R | FlotillaError]]]


@dataclass(eq=False)
class _Pending(Generic[T, R]):
    item: T
    enqueued_s: float
    deadline_s: float | None
    future: asyncio.Future[R]


@dataclass
class QueueStats:
    """Running totals, for logs, tests and (later) metrics."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    rejected_full: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    """How many batches of each size were dispatched."""


class BatchQueue(Generic[T, R]):
    """Forms batches of ``T`` and hands them to ``dispatch``."""

    def __init__(
        self,
        name: str,
        policy: BatchingSettings,
        dispatch: Dispatch[T, R],
        *,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._dispatch = dispatch
        self._clock = clock or MonotonicClock()
        self._queue: deque[_Pending[T, R]] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.max_inflight_batches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.stats = QueueStats()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        """Stop forming batches, cancel batches in flight, fail what is queued."""
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"batcher for {self.name} is shutting down"))

    async def submit(self, item: T, *, deadline_s: float | None = None) -> R:
        """Queue ``item`` and wait for its result; raises its FlotillaError."""
        if len(self._queue) >= self.policy.max_queue_size:
            self.stats.rejected_full += 1
            raise QueueFull(
                f"queue for model {self.name} is full ({self.policy.max_queue_size} requests); "
                "retry with backoff or raise max_queue_size"
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, self._clock.now(), deadline_s, future))
        # Wake the former only when it has something new to decide.
        if len(self._queue) == 1 or len(self._queue) >= self.policy.max_batch_size:
            self._wakeup.set()
        return await future  # a cancelled caller cancels the future: it is skipped

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_dead(self) -> None:
        """Remove cancelled requests and fail expired ones, anywhere in the queue."""
        now = self._clock.now()
        if not any(p.future.done() or (p.deadline_s is not None and p.deadline_s <= now) for p in self._queue):
            return
        live: deque[_Pending[T, R]] = deque()
        for pending in self._queue:
            if pending.future.done():
                continue
            if pending.deadline_s is not None and pending.deadline_s <= now:
                self.stats.expired += 1
                pending.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for model {self.name}")
                )
                continue
            live.append(pending)
        self._queue = live

    async def _next_batch(self) -> list[_Pending[T, R]]:
        max_delay_s = self.policy.max_queue_delay_us / 1e6
        while True:
            self._drop_dead()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) >= self.policy.max_batch_size:
                break
            wait_s = self._queue[0].enqueued_s + max_delay_s - self._clock.now()
            if wait_s <= 0:
                break
            self._wakeup.clear()
            await self._wait(wait_s)
        size = min(len(self._queue), self.policy.max_batch_size)
        return [self._queue.popleft() for _ in range(size)]

    async def _wait(self, delay_s: float) -> None:
        """Until ``delay_s`` passes on the clock or the queue signals a change."""
        woken = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep(delay_s))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    async def _send(self, batch: list[_Pending[T, R]]) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            deadlines = [p.deadline_s for p in live]
            deadline_s = None if None in deadlines else max(d for d in deadlines if d is not None)
            self.stats.batches += 1
            self.stats.items += len(live)
            self.stats.batch_sizes[len(live)] += 1
            try:
                results = await self._dispatch([p.item for p in live], deadline_s)
            except FlotillaError as exc:
                results = [exc] * len(live)
            except Exception:
                log.exception("batcher %s: batch dispatch failed", self.name)
                results = [FlotillaError(f"internal error dispatching a batch for {self.name}")] * len(live)
            if len(results) != len(live):
                log.error("batcher %s: %d results for %d requests", self.name, len(results), len(live))
                results = [FlotillaError("internal error: backend answered the wrong number of items")] * len(live)
            for pending, result in zip(live, results):
                if pending.future.done():
                    continue
                if isinstance(result, FlotillaError):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        finally:
            self._slots.release()

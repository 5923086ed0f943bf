"""The batcher's core: a priority request queue that releases batches.

Release rule. A batch leaves when the queue holds ``max_batch_size``
requests (or, with ``preferred_batch_sizes``, the largest preferred size),
or when the oldest queued request has waited ``max_queue_delay_us`` (an
upper bound: the timer is armed early by the clock's ``timer_slack_s``, the
event loop's timer granularity, rather than firing late), and
only while fewer than ``max_inflight_batches`` batches are out. While every
slot is busy requests keep queueing, so batches grow with load. At the
delay, the batch is the largest preferred size that fits, else everything
queued (up to ``max_batch_size``).

Order. Level 1 is the highest priority; within a level, first in first
out. Starvation bound: with ``priority_aging_us`` = A > 0, a request that
has been queued for A is served before every younger request whatever their
levels (aged requests go oldest first), so no request waits behind traffic
that arrived after it once it is A old. With A = 0 priority is strict.
With ``priority_levels`` = 0 request priorities are ignored; otherwise a
priority outside 1..levels is INVALID_ARGUMENT. When the number of levels
changes at run time, queued requests keep their level (clamped to the new
lowest) and their arrival order.

Time limits. A request's gRPC deadline always applies: when it passes while
the request is queued, the request leaves the queue with DEADLINE_EXCEEDED
and is never dispatched. A queue timeout (``default_timeout_us``, lowered
per request by ``timeout_us``) applies while queued: REJECT answers
DEADLINE_EXCEEDED; DELAY moves the request behind every request still
within its timeout (DELAYed requests do not age, leave in the order their
timeouts passed, and still end at their deadline). Limits are applied by
each request's own timer and again before every batch forms, so nothing
past its time takes a place in a batch. A request's timer is a clock
callback (``Clock.call_later``), not a task: a queued request costs no
coroutine. A caller that goes away (cancelled call, ``withdraw``) leaves the
queue at once. A full queue rejects with RESOURCE_EXHAUSTED.

Answers. Each request owns one future. A batch's dispatch answers each
live request exactly once: its own result or error, or the batch's error
when the whole batch failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from flotilla.common import metrics
from flotilla.common.clock import Clock, MonotonicClock, Timer
from flotilla.common.request_totals import BatchSizeTotals, RequestTotals, add_batch_size
from flotilla.config import BatchingSettings
from flotilla.errors import DeadlineExceeded, FlotillaError, InvalidArgument, QueueFull, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# dispatch(items, deadline_s) -> one result or FlotillaError per item, in order
Dispatch = Callable[[list[T], float | None], Awaitable[Sequence[R | FlotillaError]]]

QUEUE_WAIT_SAMPLES = 50_000


@dataclass(eq=False)
class Ticket(Generic[T, R]):
    item: T
    enqueued_s: float
    level: int
    deadline_s: float | None
    """Hard deadline (the caller's): always ends the wait."""
    timeout_s: float | None
    """Queue timeout: acts per timeout_action, only while queued."""
    future: asyncio.Future[R]
    seq: int = 0
    """Arrival order, the tie-breaker for equal clock readings."""
    queued: bool = True
    delayed: bool = False
    timer: Timer | None = None
    """The armed deadline / queue-timeout callback, if any."""


@dataclass
class QueueStats:
    """Running totals since start or the last reset."""

    batches: int = 0
    items: int = 0
    expired: int = 0
    rejected_full: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    """How many batches of each size were dispatched."""
    queue_waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=QUEUE_WAIT_SAMPLES))
    """Arrival-to-dispatch time of the most recent requests."""

    def queue_wait_ms(self, percentiles: Iterable[float]) -> list[float]:
        if not self.queue_waits_s:
            return [0.0 for _ in percentiles]
        waits = np.fromiter(self.queue_waits_s, dtype=np.float64)
        return [float(v) * 1000.0 for v in np.percentile(waits, list(percentiles))]


@dataclass
class QueueTotals:
    """Cumulative counters since the queue was created; never reset, so any
    number of readers can take differences (the controller's autoscaler does)."""

    arrivals: int = 0
    """Requests accepted into the queue."""
    dispatched: int = 0
    """Requests that left the queue in a batch."""
    queue_wait_s: float = 0.0
    """Sum of the dispatched requests' arrival-to-dispatch times."""
    last_arrival_s: float | None = None
    """When the latest request was accepted (the queue's clock); None before the first."""
    # The rest as ``RequestTotals`` says (what ``snapshot`` gives heartbeats).
    batches: int = 0
    succeeded: int = 0
    success_s: float = 0.0
    compute_s: float = 0.0
    failed: int = 0
    fail_s: float = 0.0
    batch_sizes: dict[int, BatchSizeTotals] = field(default_factory=dict)

    def snapshot(self) -> RequestTotals:
        """The counters now, as heartbeats carry them."""
        return RequestTotals(self.arrivals, self.dispatched, self.queue_wait_s, self.batches, self.succeeded,
                             self.success_s, self.compute_s, self.failed, self.fail_s, dict(self.batch_sizes))


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
        self._policy = policy
        self._dispatch = dispatch
        self._clock = clock or MonotonicClock()
        self._levels: list[deque[Ticket[T, R]]] = [deque() for _ in range(policy.levels)]
        self._delayed: deque[Ticket[T, R]] = deque()
        self._size = 0
        self._inflight = 0
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrivals = itertools.count()
        self._dispatched: set[Ticket[T, R]] = set()
        """Requests taken off the queue whose batch has not answered yet."""
        self._runner: asyncio.Task[None] | None = None
        self.stats = QueueStats()
        self.totals = QueueTotals()
        # Live gauges read the queue itself at scrape time.
        metrics.QUEUE_DEPTH.labels(name).set_function(lambda: self._size)
        metrics.INFLIGHT_BATCHES.labels(name).set_function(lambda: self._inflight)
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(name)
        self._batch_size = metrics.BATCH_SIZE.labels(name)
        self._batches = metrics.BATCHES.labels(name)
        self._batch_items = metrics.BATCH_ITEMS.labels(name)

    # -- state -----------------------------------------------------------------

    @property
    def policy(self) -> BatchingSettings:
        return self._policy

    @property
    def depth(self) -> int:
        """Requests waiting in the queue."""
        return self._size

    @property
    def inflight(self) -> int:
        """Batches dispatched and not yet answered."""
        return self._inflight

    def reset_stats(self) -> None:
        self.stats = QueueStats()

    def set_policy(self, policy: BatchingSettings) -> None:
        """Apply a new policy at once; queued requests keep their order."""
        queued = sorted((p for level in self._levels for p in level), key=lambda p: p.seq)
        self._policy = policy
        self._levels = [deque() for _ in range(policy.levels)]
        for pending in queued:
            pending.level = min(pending.level, policy.levels)
            self._levels[pending.level - 1].append(pending)
        self._wakeup.set()
        self._slot_freed.set()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=f"batcher:{self.name}")

    async def stop(self) -> None:
        """Stop forming batches, cancel batches in flight; every waiting request gets UNAVAILABLE."""
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runner = None
        queued = [*(p for level in self._levels for p in level), *self._delayed]
        for pending in [*queued, *self._dispatched]:
            self._unqueue(pending)
            self._disarm(pending)
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"batcher for {self.name} is shutting down"))

    def forget_metrics(self) -> None:
        """Remove this queue's labelled series (its model left the process; ``stop`` it first)."""
        for metric in (metrics.QUEUE_DEPTH, metrics.INFLIGHT_BATCHES, metrics.QUEUE_WAIT_SECONDS,
                       metrics.BATCH_SIZE, metrics.BATCHES, metrics.BATCH_ITEMS):
            with contextlib.suppress(KeyError):  # never created, or removed already
                metric.remove(self.name)

    # -- submitting ------------------------------------------------------------

    def _level_of(self, priority: int) -> int:
        if priority < 0:
            raise InvalidArgument(f"priority {priority} is negative; 1 is the highest, 0 uses the default")
        if priority == 0 or self._policy.priority_levels == 0:  # default, or priorities off
            return self._policy.default_level
        if priority > self._policy.levels:
            raise InvalidArgument(
                f"priority {priority} is outside 1..{self._policy.levels} for model {self.name} "
                "(1 is the highest; 0 uses the default)"
            )
        return priority

    def _queue_timeout_s(self, now: float, timeout_us: int) -> float | None:
        default_us = self._policy.default_timeout_us
        effective_us = min(timeout_us, default_us) if timeout_us and default_us else timeout_us or default_us
        return now + effective_us / 1e6 if effective_us else None

    async def submit(
        self, item: T, *, deadline_s: float | None = None, priority: int = 0, timeout_us: int = 0
    ) -> R:
        """Queue ``item`` and wait for its result; raises its FlotillaError."""
        pending = self.enqueue(item, deadline_s=deadline_s, priority=priority, timeout_us=timeout_us)
        try:
            return await pending.future
        except asyncio.CancelledError:
            self.withdraw(pending)  # the caller went away: free its place now
            raise

    def enqueue(
        self, item: T, *, deadline_s: float | None = None, priority: int = 0, timeout_us: int = 0
    ) -> Ticket[T, R]:
        """Queue ``item``; its answer (result or FlotillaError) arrives on the returned ``.future``.

        Raises at once when the item is refused (full queue, bad priority).
        """
        level = self._level_of(priority)
        if self._size >= self._policy.max_queue_size:
            self.stats.rejected_full += 1
            metrics.QUEUE_REJECTED.labels(self.name, "queue_full").inc()
            raise QueueFull(
                f"queue for model {self.name} is full ({self._policy.max_queue_size} requests, "
                "batching.max_queue_size); retry after a short backoff (e.g. 100 ms, doubling)"
            )
        now = self._clock.now()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        pending = Ticket(
            item, now, level, deadline_s, self._queue_timeout_s(now, timeout_us), future, next(self._arrivals)
        )
        self._levels[level - 1].append(pending)
        self._size += 1
        self.totals.arrivals += 1
        self.totals.last_arrival_s = now
        self._arm(pending, now)
        # Wake the former only when it has something new to decide.
        if self._size == 1 or self._size >= self._ready_size():
            self._wakeup.set()
        return pending

    def withdraw(self, pending: Ticket[T, R]) -> None:
        """The caller of ``pending`` went away: drop it (from the queue, if still queued); no answer follows."""
        self._disarm(pending)
        if not pending.future.done():
            pending.future.cancel()
        self._unqueue(pending)

    def _arm(self, pending: Ticket[T, R], now: float) -> None:
        """Arm the request's timer for the nearer of its deadline and (while queued) its queue timeout."""
        timed_out = pending.timeout_s if pending.queued else None
        limits = [t for t in (pending.deadline_s, timed_out) if t is not None]
        pending.timer = self._clock.call_later(max(0.0, min(limits) - now), lambda: self._on_timer(pending)) if limits else None

    def _disarm(self, pending: Ticket[T, R]) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None

    def _on_timer(self, pending: Ticket[T, R]) -> None:
        pending.timer = None
        if pending.future.done():
            return
        now = self._clock.now()
        self._apply_limits(pending, now)
        if not pending.future.done():
            self._arm(pending, now)  # woken a hair early, or a DELAYed request still has its deadline

    def _apply_limits(self, pending: Ticket[T, R], now: float) -> None:
        """Act on a passed deadline or queue timeout; the only place that does.

        Called by the request's own timer and, for everything queued, before
        each batch forms, whichever comes first. A request that fails gets
        its error on its future, where its caller picks it up.
        """
        if pending.deadline_s is not None and now >= pending.deadline_s:
            where = "queued" if pending.queued else "its batch was in flight"
            self._fail(pending, DeadlineExceeded(f"deadline passed while {where} for model {self.name}"))
            return
        if pending.timeout_s is None or now < pending.timeout_s:
            return  # not yet (a timer may wake a hair early): keep the limit armed
        pending.timeout_s = None
        if not pending.queued:
            return  # queue timeouts end at dispatch
        if self._policy.timeout_action == "REJECT":
            self._fail(
                pending,
                DeadlineExceeded(
                    f"queue timeout passed while queued for model {self.name}; "
                    "the model is overloaded, retry later or raise the timeout"
                ),
            )
            return
        self._unqueue(pending)  # DELAY: behind everything still within its timeout
        pending.queued, pending.delayed = True, True
        self._delayed.append(pending)
        self._size += 1

    def _fail(self, pending: Ticket[T, R], error: FlotillaError) -> None:
        if pending.queued:
            self.stats.expired += 1
            metrics.QUEUE_REJECTED.labels(self.name, "expired").inc()
        self._unqueue(pending)
        self._disarm(pending)
        if not pending.future.done():
            self.totals.failed += 1
            self.totals.fail_s += self._clock.now() - pending.enqueued_s
            pending.future.set_exception(error)  # a late answer from a batch in flight is dropped

    def _apply_limits_to_queue(self) -> None:
        now = self._clock.now()
        for pending in [p for q in (*self._levels, self._delayed) for p in q]:
            if pending.deadline_s is not None or pending.timeout_s is not None:
                self._apply_limits(pending, now)

    def _unqueue(self, pending: Ticket[T, R]) -> None:
        if not pending.queued:
            return
        source = self._delayed if pending.delayed else self._levels[pending.level - 1]
        source.remove(pending)
        pending.queued = False
        self._size -= 1

    # -- forming batches -------------------------------------------------------

    def _ready_size(self) -> int:
        """Queue length at which a batch leaves without waiting for the delay."""
        preferred = self._policy.preferred_batch_sizes
        return preferred[-1] if preferred else self._policy.max_batch_size

    def _size_at_delay(self) -> int:
        fitting = [s for s in self._policy.preferred_batch_sizes if s <= self._size]
        return fitting[-1] if fitting else min(self._size, self._policy.max_batch_size)

    def _oldest_enqueued_s(self) -> float:
        # Levels are in arrival order; delayed requests are in timeout order.
        heads = [q[0].enqueued_s for q in self._levels if q]
        return min([*heads, *(p.enqueued_s for p in self._delayed)])

    def _pop_next(self, now: float) -> Ticket[T, R]:
        """Aged requests oldest first, then by level, then delayed ones."""
        aging_s = self._policy.priority_aging_us / 1e6
        candidates = [q for q in self._levels if q]
        if aging_s > 0:
            aged = [q for q in candidates if q[0].enqueued_s + aging_s <= now]
            if aged:
                candidates = [min(aged, key=lambda q: q[0].enqueued_s)]
        source = candidates[0] if candidates else self._delayed
        pending = source.popleft()
        pending.queued = False
        self._size -= 1
        return pending

    async def _run(self) -> None:
        while True:
            while self._inflight >= self._policy.max_inflight_batches:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = await self._next_batch()
            self._dispatched.update(batch)
            self._inflight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _next_batch(self) -> list[Ticket[T, R]]:
        while True:
            self._apply_limits_to_queue()  # nothing past its time takes a place in a batch
            if self._size == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._size >= self._ready_size():
                size = self._ready_size()
                break
            # The delay is an upper bound: armed early by the timer's slack so
            # a late wake-up does not stretch it.
            wait_s = (
                self._oldest_enqueued_s() + self._policy.max_queue_delay_us / 1e6
                - self._clock.now() - getattr(self._clock, "timer_slack_s", 0.0)
            )
            if wait_s <= 0:
                size = self._size_at_delay()
                break
            self._wakeup.clear()
            await self._wait(wait_s)
        now = self._clock.now()
        return [self._pop_next(now) for _ in range(size)]

    async def _wait(self, delay_s: float) -> None:
        """Until ``delay_s`` passes on the clock or the queue signals a change."""
        woken = asyncio.ensure_future(self._wakeup.wait())
        timer = asyncio.ensure_future(self._clock.sleep(delay_s))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()

    # -- dispatching -----------------------------------------------------------

    async def _send(self, batch: list[Ticket[T, R]]) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            now = self._clock.now()
            waits = [now - p.enqueued_s for p in live]
            self.stats.queue_waits_s.extend(waits)
            # The autoscaler's totals and the scraped histogram are the same observations.
            self.totals.dispatched += len(live)
            self.totals.queue_wait_s += sum(waits)
            for wait in waits:
                self._queue_wait.observe(wait)
            self._batch_size.observe(len(live))
            self._batches.inc()
            self._batch_items.inc(len(live))
            deadlines = [p.deadline_s for p in live]
            deadline_s = None if None in deadlines else max(d for d in deadlines if d is not None)
            self.stats.batches += 1
            self.stats.items += len(live)
            self.stats.batch_sizes[len(live)] += 1
            self.totals.batches += 1
            results = await self._answers_for(live, deadline_s)
            answered_s = self._clock.now()
            totals = self.totals
            if not all(isinstance(result, FlotillaError) for result in results):  # the batch ran (Triton's batch_stats)
                add_batch_size(totals.batch_sizes, len(live), BatchSizeTotals(1, answered_s - now))
            for pending, result in zip(live, results, strict=True):
                self._disarm(pending)
                if pending.future.done():
                    continue  # failed meanwhile (its deadline: counted there), or its caller went away
                if isinstance(result, FlotillaError):
                    totals.failed += 1
                    totals.fail_s += answered_s - pending.enqueued_s
                    pending.future.set_exception(result)
                else:
                    totals.succeeded += 1
                    totals.success_s += answered_s - pending.enqueued_s
                    totals.compute_s += answered_s - now
                    pending.future.set_result(result)
        finally:
            # Unanswered ones (cancelled by stop) stay for stop() to answer.
            self._dispatched.difference_update([p for p in batch if p.future.done()])
            self._inflight -= 1
            self._slot_freed.set()

    async def _answers_for(
        self, live: list[Ticket[T, R]], deadline_s: float | None
    ) -> Sequence[R | FlotillaError]:
        try:
            results = await self._dispatch([p.item for p in live], deadline_s)
        except FlotillaError as exc:
            return [exc] * len(live)
        except Exception:
            log.exception("batcher %s: batch dispatch failed", self.name)
            return [FlotillaError(f"internal error dispatching a batch for {self.name}")] * len(live)
        if len(results) != len(live):
            log.error("batcher %s: %d results for %d requests", self.name, len(results), len(live))
            return [FlotillaError("internal error: the worker answered the wrong number of items")] * len(live)
        return results

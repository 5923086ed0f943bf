"""BatchQueue: when batches leave, who gets which answer, and what is dropped."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from fakes import FakeClock, settle

from flotilla.common.request_totals import BatchSizeTotals
from flotilla.config import BatchingSettings
from flotilla.errors import (
    Code,
    DeadlineExceeded,
    FlotillaError,
    InvalidImage,
    QueueFull,
    Unavailable,
)
from flotilla.services.batcher.queue import BatchQueue

DELAY_US = 1000
DELAY_S = DELAY_US / 1e6


class RecordingDispatch:
    """Answers ``item * 10`` per item, records every call, and can be held on an Event."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], float | None]] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.max_running = 0
        self.raises: BaseException | None = None
        self.answer = lambda item: item * 10
        self.drop_last_answer = False

    @property
    def batches(self) -> list[list[Any]]:
        return [items for items, _ in self.calls]

    def hold(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        return self.gate

    async def __call__(self, items: list[Any], deadline_s: float | None) -> list[Any]:
        self.calls.append((list(items), deadline_s))
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.raises is not None:
                raise self.raises
            results = [self.answer(item) for item in items]
            return results[:-1] if self.drop_last_answer else results
        finally:
            self.running -= 1


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.dispatch = RecordingDispatch()
        self.queue: BatchQueue[Any, Any] | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    def make(self, **policy: Any) -> BatchQueue[Any, Any]:
        settings = {"max_queue_delay_us": DELAY_US, **policy}
        self.queue = BatchQueue("m", BatchingSettings(**settings), self.dispatch, clock=self.clock)
        self.queue.start()
        return self.queue

    def submit(self, item: Any, *, deadline_s: float | None = None) -> asyncio.Task[Any]:
        assert self.queue is not None
        task = asyncio.ensure_future(self.queue.submit(item, deadline_s=deadline_s))
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def answer(task: asyncio.Task[Any]) -> Any:
    """The task's result (or its exception, raised); the task must already be finished.

    Checking ``done()`` first makes a missing answer fail the test instead of hanging it.
    """
    assert task.done(), "this request got no answer"
    return task.result()


def answers(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    return [answer(t) for t in tasks]


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    await harness.close()


async def test_full_batch_leaves_at_once_without_the_clock_moving(h: Harness) -> None:
    h.make(max_batch_size=3, max_queue_delay_us=10_000_000)
    tasks = [h.submit(i) for i in (1, 2, 3)]
    await settle()

    assert h.dispatch.batches == [[1, 2, 3]]
    assert h.clock.now() == 0.0
    assert answers(tasks) == [10, 20, 30]


async def test_partial_batch_waits_for_max_queue_delay(h: Harness) -> None:
    h.make(max_batch_size=8)
    tasks = [h.submit(1), h.submit(2)]
    await settle()
    assert h.dispatch.calls == []

    await h.clock.advance(DELAY_S * 0.9)
    assert h.dispatch.calls == [], "released before max_queue_delay_us elapsed"

    await h.clock.advance(DELAY_S * 0.2)
    assert h.dispatch.batches == [[1, 2]]
    assert answers(tasks) == [10, 20]


async def test_waiting_partial_batch_leaves_as_soon_as_it_fills(h: Harness) -> None:
    h.make(max_batch_size=3, max_queue_delay_us=10_000_000)
    tasks = [h.submit(1)]
    await settle()
    assert h.clock.sleepers == 1  # the batcher waits on the clock for the delay
    assert h.dispatch.calls == []

    tasks += [h.submit(2), h.submit(3)]
    await settle()

    assert h.dispatch.batches == [[1, 2, 3]]
    assert answers(tasks) == [10, 20, 30]


async def test_queue_delay_counts_from_the_oldest_request(h: Harness) -> None:
    h.make(max_batch_size=8)
    first = h.submit(1)
    await settle()
    await h.clock.advance(DELAY_S * 0.6)
    second = h.submit(2)
    await settle()
    assert h.dispatch.calls == []

    # 1.1 delays after the first request, only 0.5 after the second.
    await h.clock.advance(DELAY_S * 0.5)
    assert h.dispatch.batches == [[1, 2]]
    assert (answer(first), answer(second)) == (10, 20)


async def test_requests_are_batched_in_fifo_order_across_batches(h: Harness) -> None:
    h.make(max_batch_size=3, max_queue_delay_us=0, max_inflight_batches=4)
    tasks = [h.submit(i) for i in range(7)]
    await settle()

    assert h.dispatch.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert answers(tasks) == [i * 10 for i in range(7)]


async def test_stats_count_batches_items_and_sizes(h: Harness) -> None:
    q = h.make(max_batch_size=3, max_queue_delay_us=0, max_inflight_batches=4)
    tasks = [h.submit(i) for i in range(7)]
    await settle()
    answers(tasks)

    assert q.stats.batches == 3
    assert q.stats.items == 7
    assert q.stats.batch_sizes == Counter({3: 2, 1: 1})
    assert q.depth == 0


async def test_inflight_limit_holds_back_batches_which_then_grow(h: Harness) -> None:
    h.make(max_batch_size=8, max_queue_delay_us=0, max_inflight_batches=1)
    gate = h.dispatch.hold()
    first = h.submit("a")
    await settle()
    assert h.dispatch.batches == [["a"]]

    later = [h.submit(x) for x in ("b", "c", "d")]
    await settle()
    assert h.dispatch.batches == [["a"]], "a second batch went out while the only slot was busy"
    assert h.queue is not None and h.queue.depth == 3

    gate.set()
    await settle()
    assert h.dispatch.batches == [["a"], ["b", "c", "d"]]
    assert answer(first) == "aaaaaaaaaa"
    assert answers(later) == ["b" * 10, "c" * 10, "d" * 10]
    assert h.queue.stats.batch_sizes == Counter({1: 1, 3: 1})


async def test_at_most_max_inflight_batches_are_dispatched_at_once(h: Harness) -> None:
    h.make(max_batch_size=1, max_queue_delay_us=0, max_inflight_batches=2)
    gate = h.dispatch.hold()
    tasks = [h.submit(i) for i in range(5)]
    await settle()

    assert h.dispatch.running == 2
    assert h.dispatch.batches == [[0], [1]]

    gate.set()
    await settle()
    assert answers(tasks) == [0, 10, 20, 30, 40]
    assert h.dispatch.max_running == 2


async def test_full_queue_rejects_at_once_with_queue_full(h: Harness) -> None:
    q = h.make(max_batch_size=8, max_queue_size=2)
    queued = [h.submit(1), h.submit(2)]
    await settle()

    rejected = h.submit(3)
    await asyncio.sleep(0)  # one step: the rejection must not wait for the batcher
    with pytest.raises(QueueFull) as info:
        answer(rejected)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert q.stats.rejected_full == 1

    await h.clock.advance(DELAY_S * 2)
    assert h.dispatch.batches == [[1, 2]]
    assert answers(queued) == [10, 20]


async def test_per_item_errors_go_only_to_their_own_submitter(h: Harness) -> None:
    h.make(max_batch_size=3)
    bad = InvalidImage("image 2 is not a JPEG")
    h.dispatch.answer = lambda item: bad if item == 2 else item * 10
    t1, t2, t3 = h.submit(1), h.submit(2), h.submit(3)
    await settle()

    assert answer(t1) == 10
    assert answer(t3) == 30
    with pytest.raises(InvalidImage) as info:
        answer(t2)
    assert info.value is bad


async def test_dispatch_raising_a_flotilla_error_fails_the_whole_batch(h: Harness) -> None:
    h.make(max_batch_size=2)
    h.dispatch.raises = Unavailable("no preprocess worker")
    tasks = [h.submit(1), h.submit(2)]
    await settle()

    for task in tasks:
        with pytest.raises(Unavailable, match="no preprocess worker"):
            answer(task)


async def test_dispatch_raising_an_unexpected_error_fails_the_batch_as_internal(h: Harness) -> None:
    h.make(max_batch_size=2)
    h.dispatch.raises = RuntimeError("secret detail")
    tasks = [h.submit(1), h.submit(2)]
    await settle()

    for task in tasks:
        with pytest.raises(FlotillaError) as info:
            answer(task)
        assert info.value.code == Code.INTERNAL
        assert "secret detail" not in info.value.message


async def test_wrong_number_of_results_fails_every_request(h: Harness) -> None:
    h.make(max_batch_size=2)
    h.dispatch.drop_last_answer = True
    tasks = [h.submit(1), h.submit(2)]
    await settle()

    for task in tasks:
        with pytest.raises(FlotillaError) as info:
            answer(task)
        assert info.value.code == Code.INTERNAL


async def test_request_expired_while_queued_gets_deadline_exceeded_and_is_not_dispatched(h: Harness) -> None:
    q = h.make(max_batch_size=8)
    expiring = h.submit("late", deadline_s=DELAY_S / 2)
    keeps = h.submit("ok")
    await settle()

    await h.clock.advance(DELAY_S * 1.1)

    assert h.dispatch.batches == [["ok"]]
    with pytest.raises(DeadlineExceeded) as info:
        answer(expiring)
    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert answer(keeps) == "ok" * 10
    assert q.stats.expired == 1
    assert q.stats.batch_sizes == Counter({1: 1})


async def test_batch_deadline_is_the_latest_one_or_none_if_any_request_has_none(h: Harness) -> None:
    h.make(max_batch_size=2)
    first = [h.submit(1, deadline_s=5.0), h.submit(2, deadline_s=7.0)]
    await settle()
    second = [h.submit(3, deadline_s=5.0), h.submit(4)]
    await settle()
    answers(first + second)

    assert [deadline for _, deadline in h.dispatch.calls] == [7.0, None]


async def test_cancelled_submitter_is_not_dispatched(h: Harness) -> None:
    h.make(max_batch_size=8)
    gone = h.submit("gone")
    stays = h.submit("stays")
    await settle()

    gone.cancel()
    await settle()
    await h.clock.advance(DELAY_S * 1.1)

    assert h.dispatch.batches == [["stays"]]
    assert gone.cancelled()
    assert answer(stays) == "stays" * 10


async def test_cancelled_requests_do_not_count_towards_a_full_batch(h: Harness) -> None:
    h.make(max_batch_size=2)
    gone = h.submit("gone")
    await settle()
    gone.cancel()
    await settle()

    tasks = [h.submit("b"), h.submit("c")]
    await settle()

    assert h.dispatch.batches == [["b", "c"]]
    assert answers(tasks) == ["b" * 10, "c" * 10]


async def test_stop_fails_queued_requests_with_unavailable(h: Harness) -> None:
    q = h.make(max_batch_size=8)
    tasks = [h.submit(1), h.submit(2)]
    await settle()

    await q.stop()
    await settle()

    for task in tasks:
        with pytest.raises(Unavailable, match="shutting down"):
            answer(task)
    assert h.dispatch.calls == []
    assert q.depth == 0


async def test_stop_answers_requests_of_batches_in_flight(h: Harness) -> None:
    q = h.make(max_batch_size=1, max_queue_delay_us=0)
    h.dispatch.hold()
    in_flight = h.submit(1)
    await settle()
    assert h.dispatch.batches == [[1]]

    await q.stop()
    await settle()

    with pytest.raises(Unavailable):
        answer(in_flight)


async def test_cancelled_requests_do_not_fill_the_queue(h: Harness) -> None:
    q = h.make(max_batch_size=8, max_queue_delay_us=0, max_queue_size=2, max_inflight_batches=1)
    h.dispatch.hold()
    h.submit("in flight")
    await settle()
    gone = [h.submit("b"), h.submit("c")]  # queued behind the busy slot
    await settle()
    for task in gone:
        task.cancel()
    await settle()

    newcomer = h.submit("d")
    await settle()

    assert not newcomer.done(), f"rejected although no live request is queued: {newcomer.exception()!r}"
    assert q.stats.rejected_full == 0


async def test_delay_is_an_upper_bound_armed_early_by_the_clocks_timer_slack(h: Harness) -> None:
    """A clock whose sleeps may end late (epoll's 1 ms rounding) gets the timer early, not the batch late."""
    h.clock.timer_slack_s = 0.001
    h.make(max_batch_size=8, max_queue_delay_us=10_000)
    h.submit("x")
    await settle()

    await h.clock.advance(0.0089)
    assert h.dispatch.batches == []
    await h.clock.advance(0.0002)  # within the slack of the 10 ms delay: released
    assert h.dispatch.batches == [["x"]]


async def test_totals_count_each_answer_once_with_its_times(h: Harness) -> None:
    """What heartbeats carry to the controller (and Triton's ModelStatistics shows): batches, and each
    request's outcome with its arrival-to-answer time, and for a success its batch's time."""
    q = h.make(max_batch_size=3)
    h.dispatch.answer = lambda item: InvalidImage("not a JPEG") if item == 2 else item * 10
    gate = h.dispatch.hold()
    tasks = [h.submit(1), h.submit(2), h.submit(3)]  # a full batch: dispatched at 0 s
    await settle()
    h.clock.set(0.5)
    gate.set()
    await settle()
    assert [t.exception() is None for t in tasks] == [True, False, True]
    t = q.totals
    assert (t.arrivals, t.dispatched, t.batches) == (3, 3, 1)
    assert (t.succeeded, t.success_s, t.compute_s) == (2, 1.0, 1.0)
    assert (t.failed, t.fail_s) == (1, 0.5)

    late = h.submit("late", deadline_s=0.5 + DELAY_S / 2)  # expires while queued, 0.5 ms after arriving
    await settle()
    await h.clock.advance(DELAY_S / 2)
    with pytest.raises(DeadlineExceeded):
        answer(late)
    assert (q.totals.failed, q.totals.batches) == (2, 1)
    assert q.totals.fail_s == pytest.approx(0.5 + DELAY_S / 2)


async def test_batches_that_ran_are_counted_by_size_with_their_time(h: Harness) -> None:
    """Triton's batch_stats: each batch with a result, once, by its size; a batch with none did not run."""
    q = h.make(max_batch_size=3)
    h.dispatch.answer = lambda item: InvalidImage("not a JPEG") if item < 0 else item
    gate = h.dispatch.hold()
    tasks = [h.submit(1), h.submit(-2), h.submit(3)]  # a full batch at 0 s, one of it failing alone
    await settle()
    h.clock.set(0.25)
    gate.set()
    await settle()
    assert q.totals.batch_sizes == {3: BatchSizeTotals(1, 0.25)}
    failing = [h.submit(-1), h.submit(-4), h.submit(-5)]  # every request of it fails: it did not run
    await settle()
    assert all(t.exception() is not None for t in failing) and len(tasks) == 3
    assert q.totals.batch_sizes == {3: BatchSizeTotals(1, 0.25)} and q.totals.batches == 2
    h.submit(7)
    await settle()
    await h.clock.advance(2 * DELAY_S)  # a batch of one, released by its delay
    await settle()
    assert q.totals.batch_sizes == {3: BatchSizeTotals(1, 0.25), 1: BatchSizeTotals(1, 0.0)}
    assert q.totals.snapshot().batch_sizes == q.totals.batch_sizes
    assert q.totals.snapshot().batch_sizes is not q.totals.batch_sizes  # a heartbeat's copy stays as it was

"""BatchQueue's Triton-style policies: preferred sizes, priorities, aging, time limits, live changes.

Every test runs on the fake clock: time moves only through ``clock.advance``,
so "before the delay" and "at the delay" are exact and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import pytest
from fakes import FakeClock, settle
from test_batch_queue import Harness, answer, answers

from flotilla.config import BatchingSettings
from flotilla.errors import Code, DeadlineExceeded, InvalidArgument, QueueFull
from flotilla.services.batcher.queue import BatchQueue

DELAY_US = 1000
DELAY_S = DELAY_US / 1e6


class PolicyHarness(Harness):
    """``Harness`` whose submits take every per-request option.

    Its held batches can be released one round at a time (``release_inflight``).
    """

    def submit(  # type: ignore[override]
        self, item: Any, *, deadline_s: float | None = None, priority: int = 0, timeout_us: int = 0
    ) -> asyncio.Task[Any]:
        assert self.queue is not None
        task = asyncio.ensure_future(
            self.queue.submit(item, deadline_s=deadline_s, priority=priority, timeout_us=timeout_us)
        )
        self._tasks.append(task)
        return task

    async def hold_with_one_in_flight(self, **policy: Any) -> BatchQueue[Any, Any]:
        """A queue whose only dispatch slot is busy with ``["busy"]``, so that later submits stay queued."""
        q = self.make(max_inflight_batches=1, max_queue_delay_us=0, **policy)
        self.dispatch.hold()
        self.submit("busy")
        await settle()
        assert self.dispatch.batches == [["busy"]]
        assert q.inflight == 1
        return q

    async def release_inflight(self) -> None:
        """Answer the batches in flight now; batches dispatched after this are held again."""
        released = self.dispatch.gate
        assert released is not None, "dispatch is not held"
        self.dispatch.gate = asyncio.Event()
        released.set()
        await settle()

    def changed_policy(self, **changes: Any) -> BatchingSettings:
        """The queue's policy with ``changes``, validated like any configured policy."""
        assert self.queue is not None
        return BatchingSettings(**{**self.queue.policy.model_dump(), **changes})


@pytest.fixture
async def h():
    harness = PolicyHarness()
    yield harness
    await harness.close()


def rejected_with(task: asyncio.Task[Any], error: type[Exception]) -> Exception:
    assert task.done(), "this request got no answer"
    exc = task.exception()
    assert isinstance(exc, error), f"expected {error.__name__}, got {exc!r}"
    return exc


# -- preferred_batch_sizes ------------------------------------------------------


async def test_largest_preferred_size_leaves_at_once(h: PolicyHarness) -> None:
    h.make(max_batch_size=16, preferred_batch_sizes=[4, 8])
    tasks = [h.submit(i) for i in range(8)]
    await settle()

    assert h.dispatch.batches == [list(range(8))]
    assert h.clock.now() == 0.0
    assert answers(tasks) == [i * 10 for i in range(8)]


async def test_between_preferred_sizes_waits_for_the_delay_then_sends_the_largest_that_fits(
    h: PolicyHarness,
) -> None:
    h.make(max_batch_size=16, preferred_batch_sizes=[4, 8])
    tasks = [h.submit(i) for i in range(6)]
    await settle()
    await h.clock.advance(DELAY_S * 0.99)
    assert h.dispatch.calls == [], "released before max_queue_delay_us although no batch of 8 formed"

    await h.clock.advance(DELAY_S * 0.02)

    assert h.dispatch.batches == [[0, 1, 2, 3], [4, 5]]
    assert answers(tasks) == [i * 10 for i in range(6)]


async def test_below_the_smallest_preferred_size_everything_leaves_at_the_delay(h: PolicyHarness) -> None:
    h.make(max_batch_size=16, preferred_batch_sizes=[4, 8])
    tasks = [h.submit(i) for i in range(3)]
    await settle()
    await h.clock.advance(DELAY_S * 0.99)
    assert h.dispatch.calls == []

    await h.clock.advance(DELAY_S * 0.02)

    assert h.dispatch.batches == [[0, 1, 2]]
    assert answers(tasks) == [0, 10, 20]


async def test_at_the_delay_the_largest_of_several_fitting_preferred_sizes_is_used(h: PolicyHarness) -> None:
    h.make(max_batch_size=16, preferred_batch_sizes=[2, 4, 8])
    for i in range(7):
        h.submit(i)
    await settle()

    await h.clock.advance(DELAY_S * 1.01)

    assert h.dispatch.batches == [[0, 1, 2, 3], [4, 5], [6]]


async def test_remainder_after_the_largest_preferred_batch_waits_for_the_delay(h: PolicyHarness) -> None:
    h.make(max_batch_size=16, preferred_batch_sizes=[4, 8])
    for i in range(12):
        h.submit(i)
    await settle()
    assert h.dispatch.batches == [list(range(8))]

    await h.clock.advance(DELAY_S * 0.99)
    assert len(h.dispatch.batches) == 1, "a smaller preferred size left before the delay"

    await h.clock.advance(DELAY_S * 0.02)
    assert h.dispatch.batches == [list(range(8)), [8, 9, 10, 11]]


# -- priorities -----------------------------------------------------------------


async def test_next_batch_is_ordered_by_level_then_arrival(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=4, priority_levels=3)
    tasks = [
        h.submit("3a", priority=3),
        h.submit("3b", priority=3),
        h.submit("1", priority=1),
        h.submit("2", priority=2),
    ]
    await settle()

    await h.release_inflight()

    assert h.dispatch.batches[1] == ["1", "2", "3a", "3b"]
    await h.release_inflight()
    assert answers(tasks) == ["3a" * 10, "3b" * 10, "1" * 10, "2" * 10]


async def test_priority_zero_uses_the_default_priority_level(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=8, priority_levels=3, default_priority_level=2)
    h.submit("3", priority=3)
    h.submit("default", priority=0)
    h.submit("1", priority=1)
    h.submit("2", priority=2)
    await settle()

    await h.release_inflight()

    assert h.dispatch.batches[1] == ["1", "default", "2", "3"]


async def test_default_priority_level_zero_means_the_lowest_level(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=8, priority_levels=3)
    h.submit("default", priority=0)
    h.submit("3", priority=3)
    h.submit("2", priority=2)
    h.submit("1", priority=1)
    await settle()

    await h.release_inflight()

    assert h.dispatch.batches[1] == ["1", "2", "default", "3"]


async def test_priority_above_priority_levels_is_rejected_at_once_naming_the_range(h: PolicyHarness) -> None:
    q = h.make(max_batch_size=8, priority_levels=3)
    bad = h.submit("x", priority=4)
    await asyncio.sleep(0)  # one step: the rejection must not wait for the batcher or the clock

    exc = rejected_with(bad, InvalidArgument)
    assert exc.code == Code.INVALID_ARGUMENT
    assert "1..3" in str(exc)
    assert q.depth == 0
    await h.clock.advance(DELAY_S * 2)
    assert h.dispatch.calls == []


async def test_highest_allowed_priority_is_accepted(h: PolicyHarness) -> None:
    h.make(max_batch_size=8, priority_levels=3)
    task = h.submit("x", priority=3)
    await settle()
    await h.clock.advance(DELAY_S * 1.1)

    assert answer(task) == "x" * 10


# -- starvation bound (priority_aging_us) -------------------------------------------

AGING_US = 10_000
AGING_S = AGING_US / 1e6
T0_S = AGING_S * 0.25


async def _feed_level_one_and_release(h: PolicyHarness, rounds: int, step_s: float) -> list[float]:
    """Each round: time passes, a new level-1 request arrives, the batch in flight answers.

    Returns the clock time at which each round's next batch formed.
    """
    formed_at = []
    for i in range(rounds):
        await h.clock.advance(step_s)
        h.submit(f"hi{i}", priority=1)
        await settle()
        assert h.queue is not None
        assert h.queue.depth >= 2, "the level-1 supply ran dry; the test no longer tests starvation"
        await h.release_inflight()
        formed_at.append(h.clock.now())
    return formed_at


async def _low_request_behind_level_one_traffic(h: PolicyHarness, aging_us: int) -> asyncio.Task[Any]:
    """The only slot is busy; at ``T0_S`` a level-1 request and then the level-2 request "low" queue up."""
    await h.hold_with_one_in_flight(max_batch_size=1, priority_levels=2, priority_aging_us=aging_us)
    await h.clock.advance(T0_S)
    h.submit("hi-first", priority=1)
    low = h.submit("low", priority=2)
    await settle()
    return low


async def test_low_priority_request_waits_while_younger_than_the_aging_bound(h: PolicyHarness) -> None:
    low = await _low_request_behind_level_one_traffic(h, AGING_US)

    formed_at = await _feed_level_one_and_release(h, rounds=3, step_s=AGING_S * 0.3)

    assert formed_at[-1] < T0_S + AGING_S
    assert h.dispatch.batches == [["busy"], ["hi-first"], ["hi0"], ["hi1"]]
    assert not low.done()


async def test_low_priority_request_goes_first_once_older_than_the_aging_bound(h: PolicyHarness) -> None:
    low = await _low_request_behind_level_one_traffic(h, AGING_US)
    await _feed_level_one_and_release(h, rounds=3, step_s=AGING_S * 0.3)
    await h.clock.advance(AGING_S * 0.3)  # now T0 + 1.2 A
    h.submit("hi-young", priority=1)
    await settle()
    assert h.queue is not None and h.queue.depth == 3  # "low", and two level-1 requests younger than it

    await h.release_inflight()  # the first batch formed after T0 + A

    assert h.dispatch.batches[-1] == ["low"]
    await h.release_inflight()
    assert answer(low) == "low" * 10


async def test_aged_requests_are_served_oldest_first_across_levels(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=4, priority_levels=3, priority_aging_us=AGING_US)
    h.submit("3-old", priority=3)
    await settle()
    await h.clock.advance(AGING_S * 0.1)
    h.submit("2-old", priority=2)
    await settle()
    await h.clock.advance(AGING_S * 1.5)  # both are older than A now
    h.submit("1-young", priority=1)
    h.submit("3-young", priority=3)
    await settle()

    await h.release_inflight()

    assert h.dispatch.batches[1] == ["3-old", "2-old", "1-young", "3-young"]


async def test_strict_priority_without_aging_starves_while_level_one_keeps_coming(h: PolicyHarness) -> None:
    low = await _low_request_behind_level_one_traffic(h, aging_us=0)

    await _feed_level_one_and_release(h, rounds=10, step_s=AGING_S * 0.3)  # 3 A and more

    assert ["low"] not in h.dispatch.batches
    assert not low.done()

    await h.release_inflight()  # the last level-1 request goes out
    await h.release_inflight()  # only now, with no level-1 request left
    assert h.dispatch.batches[-1] == ["low"]
    await h.release_inflight()
    assert answer(low) == "low" * 10


# -- queue timeouts -------------------------------------------------------------


async def test_queue_timeout_reject_answers_deadline_exceeded_when_it_passes(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, default_timeout_us=500, timeout_action="REJECT")
    late = h.submit("late")
    await settle()
    assert q.depth == 1

    await h.clock.advance(500e-6 * 0.9)
    assert not late.done()

    await h.clock.advance(500e-6 * 0.2)
    exc = rejected_with(late, DeadlineExceeded)
    assert exc.code == Code.DEADLINE_EXCEEDED
    assert q.stats.expired == 1
    assert q.depth == 0

    await h.release_inflight()
    await h.clock.advance(DELAY_S * 10)
    assert h.dispatch.batches == [["busy"]], "a request rejected by its queue timeout was dispatched"


async def test_request_timeout_lower_than_the_default_applies(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, default_timeout_us=10_000, timeout_action="REJECT")
    short = h.submit("short", timeout_us=500)
    default = h.submit("default")
    await settle()

    await h.clock.advance(600e-6)

    rejected_with(short, DeadlineExceeded)
    assert not default.done()
    assert q.depth == 1

    await h.clock.advance(10_000e-6)
    rejected_with(default, DeadlineExceeded)
    assert q.stats.expired == 2


async def test_request_timeout_higher_than_the_default_is_capped_at_the_default(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, default_timeout_us=500, timeout_action="REJECT")
    greedy = h.submit("greedy", timeout_us=10_000)
    await settle()

    await h.clock.advance(600e-6)

    rejected_with(greedy, DeadlineExceeded)
    assert q.depth == 0


async def test_request_timeout_applies_when_the_model_has_no_default(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=8, timeout_action="REJECT")
    own = h.submit("own", timeout_us=500)
    await settle()

    await h.clock.advance(600e-6)

    rejected_with(own, DeadlineExceeded)


async def test_queue_timeout_does_not_apply_once_dispatched(h: PolicyHarness) -> None:
    q = h.make(max_batch_size=1, max_queue_delay_us=0, default_timeout_us=500, timeout_action="REJECT")
    gate = h.dispatch.hold()
    slow = h.submit("slow")
    await settle()
    assert h.dispatch.batches == [["slow"]]

    await h.clock.advance(5 * 500e-6)
    assert not slow.done()

    gate.set()
    await settle()
    assert answer(slow) == "slow" * 10
    assert q.stats.expired == 0


async def test_queue_timeout_delay_moves_the_request_behind_every_timely_one(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=1, timeout_action="DELAY")
    a = h.submit("A", timeout_us=500)
    b = h.submit("B")
    c = h.submit("C")
    await settle()

    await h.clock.advance(600e-6)  # A times out while queued
    assert not a.done(), "DELAY must not reject"
    assert q.depth == 3
    d = h.submit("D")  # arrives after A timed out, within its own timeout
    await settle()

    for _ in range(5):
        await h.release_inflight()

    assert h.dispatch.batches == [["busy"], ["B"], ["C"], ["D"], ["A"]]
    assert answers([a, b, c, d]) == ["A" * 10, "B" * 10, "C" * 10, "D" * 10]
    assert q.stats.expired == 0


async def test_queue_timeout_delay_puts_the_request_last_in_the_next_batch(h: PolicyHarness) -> None:
    await h.hold_with_one_in_flight(max_batch_size=8, timeout_action="DELAY")
    h.submit("A", timeout_us=500)
    h.submit("B")
    h.submit("C")
    await settle()
    await h.clock.advance(600e-6)

    await h.release_inflight()

    assert h.dispatch.batches[1] == ["B", "C", "A"]


async def test_hard_deadline_still_rejects_a_delayed_request(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, timeout_action="DELAY")
    a = h.submit("A", timeout_us=500, deadline_s=0.002)
    await settle()
    await h.clock.advance(600e-6)
    assert not a.done()

    await h.clock.advance(0.0015)  # past the deadline, still queued behind the busy slot

    rejected_with(a, DeadlineExceeded)
    assert q.depth == 0
    assert q.stats.expired == 1
    await h.release_inflight()
    assert h.dispatch.batches == [["busy"]]


async def test_delayed_requests_still_leave_within_max_queue_delay_of_the_oldest(h: PolicyHarness) -> None:
    h.make(max_batch_size=8, max_queue_delay_us=10_000, timeout_action="DELAY")
    h.submit("A", timeout_us=5000)  # arrives first, times out second
    await settle()
    await h.clock.advance(0.001)
    h.submit("B", timeout_us=1000)  # arrives second, times out first
    await settle()
    await h.clock.advance(0.0015)  # B is delayed
    await h.clock.advance(0.003)  # A is delayed behind B
    await h.clock.advance(0.004)  # 9.5 ms after A arrived
    assert h.dispatch.calls == []

    await h.clock.advance(0.0006)  # 10.1 ms after A arrived

    assert len(h.dispatch.batches) == 1, "A has waited longer than max_queue_delay_us"
    assert sorted(h.dispatch.batches[0]) == ["A", "B"]


class EarlyWakingClock(FakeClock):
    """Ends each sleep ``EARLY_S`` before its time, as asyncio's timers may within the clock's resolution."""

    EARLY_S = 1e-6

    async def sleep(self, delay_s: float) -> None:
        await super().sleep(delay_s - self.EARLY_S)


async def test_queue_timeout_survives_a_timer_that_wakes_slightly_early(h: PolicyHarness) -> None:
    h.clock = EarlyWakingClock()
    q = await h.hold_with_one_in_flight(max_batch_size=8, default_timeout_us=500, timeout_action="REJECT")
    late = h.submit("late")
    await settle()

    # Its timer fires now, although the timeout has not passed yet.
    await h.clock.advance(500e-6 - EarlyWakingClock.EARLY_S / 2)
    assert not late.done()
    await h.clock.advance(500e-6)  # well past the timeout

    rejected_with(late, DeadlineExceeded)
    assert q.depth == 0


# -- hard deadline ----------------------------------------------------------------


async def test_deadline_passing_while_queued_rejects_then_and_never_dispatches(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8)
    late = h.submit("late", deadline_s=0.005)
    await settle()

    await h.clock.advance(0.0049)
    assert not late.done()

    await h.clock.advance(0.0002)
    exc = rejected_with(late, DeadlineExceeded)
    assert "queued" in str(exc)
    assert q.depth == 0
    assert q.stats.expired == 1

    await h.release_inflight()
    await h.clock.advance(DELAY_S * 10)
    assert h.dispatch.batches == [["busy"]]


async def test_request_whose_deadline_passed_before_the_batch_formed_takes_no_place_in_it(
    h: PolicyHarness,
) -> None:
    q = h.make(max_batch_size=16, preferred_batch_sizes=[2, 4])
    keeps = h.submit("keeps")
    await settle()  # the batcher now waits on the clock for the delay
    await h.clock.advance(DELAY_S * 0.1)
    late = h.submit("late", deadline_s=DELAY_S * 0.5)
    other = h.submit("other")
    await settle()

    await h.clock.advance(DELAY_S)  # one step past both the deadline and the delay

    rejected_with(late, DeadlineExceeded)
    assert h.dispatch.batches == [["keeps", "other"]], "the expired request took a place in the batch"
    assert answers([keeps, other]) == ["keeps" * 10, "other" * 10]
    assert q.stats.expired == 1


async def test_request_past_its_deadline_is_not_dispatched_even_before_its_timer_runs(
    h: PolicyHarness,
) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8)
    late = h.submit("late", deadline_s=0.005)
    await settle()

    h.clock.set(0.006)  # the deadline has passed; the loop has not yet run the request's timer
    await h.release_inflight()  # a slot frees in this same turn and the next batch forms
    await h.clock.advance(0)  # now the overdue timers run

    rejected_with(late, DeadlineExceeded)
    assert h.dispatch.batches == [["busy"]], "a request past its deadline was dispatched"
    assert q.stats.expired == 1


@pytest.fixture
async def tasks_created() -> Any:
    """Every asyncio task created during the test (the queue's own dispatch tasks included)."""
    loop = asyncio.get_running_loop()
    created: list[asyncio.Task[Any]] = []
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kwargs)
        created.append(task)
        return task

    loop.set_task_factory(factory)
    try:
        yield created
    finally:
        loop.set_task_factory(previous)


async def test_deadline_passing_in_flight_fails_the_request_and_drops_the_late_answer(
    h: PolicyHarness, tasks_created: list[asyncio.Task[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    q = h.make(max_batch_size=1, max_queue_delay_us=0)
    gate = h.dispatch.hold()
    slow = h.submit("slow", deadline_s=0.005)
    await settle()
    assert h.dispatch.batches == [["slow"]]

    await h.clock.advance(0.006)
    exc = rejected_with(slow, DeadlineExceeded)
    assert "in flight" in str(exc)

    gate.set()  # the late answer arrives
    await settle()

    failed = [t for t in tasks_created if t is not slow and t.done() and not t.cancelled() and t.exception()]
    assert failed == [], "delivering the late answer raised"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert q.inflight == 0
    assert q.stats.expired == 0  # it had left the queue
    after = h.submit("after")
    await settle()
    assert answer(after) == "after" * 10


# -- set_policy -------------------------------------------------------------------


async def test_raising_max_batch_size_applies_to_the_next_batch(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=2)
    tasks = [h.submit(i) for i in range(4)]
    await settle()

    q.set_policy(h.changed_policy(max_batch_size=4))
    await h.release_inflight()

    assert h.dispatch.batches == [["busy"], [0, 1, 2, 3]]
    await h.release_inflight()
    assert answers(tasks) == [0, 10, 20, 30]


async def test_raising_max_inflight_batches_sends_a_waiting_batch_at_once(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=1)
    h.submit("waiting")
    await settle()
    assert h.dispatch.batches == [["busy"]]

    q.set_policy(h.changed_policy(max_inflight_batches=2))
    await settle()

    assert h.dispatch.batches == [["busy"], ["waiting"]]
    assert q.inflight == 2


async def test_lowering_priority_levels_clamps_to_the_lowest_level_in_arrival_order(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, priority_levels=3)
    for item, priority in (("3a", 3), ("2", 2), ("1", 1), ("3b", 3)):
        h.submit(item, priority=priority)
        await settle()
        await h.clock.advance(1e-6)

    q.set_policy(h.changed_policy(priority_levels=2))
    await h.release_inflight()

    assert q.depth == 0
    assert h.dispatch.batches[1] == ["1", "3a", "2", "3b"]


async def test_turning_priorities_off_serves_queued_requests_in_arrival_order(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, priority_levels=3)
    for item, priority in (("3a", 3), ("2", 2), ("1", 1), ("3b", 3)):
        h.submit(item, priority=priority)
        await settle()
        await h.clock.advance(1e-6)

    q.set_policy(h.changed_policy(priority_levels=0))
    assert q.depth == 4
    await h.release_inflight()

    assert h.dispatch.batches[1] == ["3a", "2", "1", "3b"]


async def test_lowering_priority_levels_keeps_arrival_order_for_simultaneous_arrivals(
    h: PolicyHarness,
) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, priority_levels=3)
    for item, priority in (("3a", 3), ("2", 2), ("1", 1), ("3b", 3)):
        h.submit(item, priority=priority)  # all at the same clock reading
    await settle()

    q.set_policy(h.changed_policy(priority_levels=1))
    await h.release_inflight()

    assert h.dispatch.batches[1] == ["3a", "2", "1", "3b"]


async def test_lowering_max_queue_size_below_depth_rejects_new_but_keeps_queued(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, max_queue_size=10)
    queued = [h.submit(i) for i in range(3)]
    await settle()

    q.set_policy(h.changed_policy(max_queue_size=2))
    rejected = h.submit("new")
    await asyncio.sleep(0)

    rejected_with(rejected, QueueFull)
    assert q.depth == 3
    assert q.stats.rejected_full == 1
    await h.release_inflight()
    assert h.dispatch.batches == [["busy"], [0, 1, 2]]
    await h.release_inflight()
    assert answers(queued) == [0, 10, 20]


# -- stats ------------------------------------------------------------------------


async def test_queue_wait_percentiles_measure_the_fake_clock_wait(h: PolicyHarness) -> None:
    q = h.make(max_batch_size=8)
    tasks = [h.submit(i) for i in range(3)]
    await settle()

    await h.clock.advance(DELAY_S)
    answers(tasks)

    p50, p99 = q.stats.queue_wait_ms([50, 99])
    assert p50 == pytest.approx(DELAY_US / 1000)
    assert p99 == pytest.approx(DELAY_US / 1000)


async def test_queue_wait_percentiles_spread_over_different_waits(h: PolicyHarness) -> None:
    q = h.make(max_batch_size=8, max_queue_delay_us=4000)
    h.submit("4ms")
    await settle()
    await h.clock.advance(0.003)
    h.submit("1ms")
    await settle()

    await h.clock.advance(0.001)  # both leave now: waits of 4 ms and 1 ms

    assert h.dispatch.batches == [["4ms", "1ms"]]
    p0, p50, p100 = q.stats.queue_wait_ms([0, 50, 100])
    assert (p0, p50, p100) == (pytest.approx(1.0), pytest.approx(2.5), pytest.approx(4.0))


async def test_queue_wait_is_zero_without_samples(h: PolicyHarness) -> None:
    q = h.make()
    assert q.stats.queue_wait_ms([50, 99]) == [0.0, 0.0]


async def test_reset_stats_zeroes_every_counter(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, max_queue_size=1, default_timeout_us=500)
    h.submit("expires")
    await settle()
    h.submit("rejected")
    await settle()
    await h.clock.advance(600e-6)
    assert (q.stats.batches, q.stats.expired, q.stats.rejected_full) == (1, 1, 1)

    q.reset_stats()

    assert (q.stats.batches, q.stats.items, q.stats.expired, q.stats.rejected_full) == (0, 0, 0, 0)
    assert q.stats.batch_sizes == Counter()
    assert q.stats.queue_wait_ms([50, 99]) == [0.0, 0.0]
    await h.release_inflight()
    assert q.stats.batches == 0, "answering a batch dispatched before the reset counted it again"


async def test_depth_and_inflight_track_queued_requests_and_open_batches(h: PolicyHarness) -> None:
    q = h.make(max_batch_size=1, max_queue_delay_us=0, max_inflight_batches=2)
    h.dispatch.hold()
    assert (q.depth, q.inflight) == (0, 0)

    tasks = [h.submit(i) for i in range(3)]
    await settle()
    assert (q.depth, q.inflight) == (1, 2)

    await h.release_inflight()
    assert (q.depth, q.inflight) == (0, 1)

    await h.release_inflight()
    assert (q.depth, q.inflight) == (0, 0)
    assert answers(tasks) == [0, 10, 20]


# -- cancellation -----------------------------------------------------------------


async def test_cancelled_request_leaves_the_queue_at_once_while_every_slot_is_busy(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, max_queue_size=3)
    a, gone, c = h.submit("a"), h.submit("gone"), h.submit("c")
    await settle()
    assert q.depth == 3

    gone.cancel()
    await settle()

    assert q.depth == 2
    assert h.dispatch.batches == [["busy"]], "the place was freed by forming a batch, not by the cancel"
    d = h.submit("d")  # the freed place is usable right away
    await settle()
    assert not d.done()
    assert q.stats.rejected_full == 0

    await h.release_inflight()
    assert h.dispatch.batches[1] == ["a", "c", "d"]
    await h.release_inflight()
    assert answers([a, c, d]) == ["a" * 10, "c" * 10, "d" * 10]


async def test_cancelling_a_delayed_request_frees_its_place_and_its_timers(h: PolicyHarness) -> None:
    q = await h.hold_with_one_in_flight(max_batch_size=8, timeout_action="DELAY")
    gone = h.submit("gone", timeout_us=500, deadline_s=1.0)
    await settle()
    await h.clock.advance(600e-6)  # now delayed, still waiting on its deadline
    assert q.depth == 1
    timers = h.clock.timers
    assert timers >= 1, "the delayed request waits on its deadline timer"

    gone.cancel()
    await settle()

    assert q.depth == 0
    assert h.clock.timers == timers - 1, "the cancelled request left its deadline timer behind"
    await h.release_inflight()
    assert h.dispatch.batches == [["busy"]]

"""``answer_as_completed`` (services.router.streaming) with fakes: a sender of requests, a handler
whose answers the test releases one by one, and a receiver of answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import pytest

from flotilla.services.router import streaming
from flotilla.services.router.streaming import answer_as_completed


class Answers(Protocol):
    """What the sender reads of a receiver: the answers sent so far."""

    answers: list[str]


class Sender:
    """The request side: an async iterator over queued requests; it records, at each pull, how many
    requests were in flight (pulled and not yet answered by the receiver)."""

    def __init__(self, receiver: Answers, requests: list[str] | None = None, *, end: bool = True) -> None:
        self.receiver = receiver
        self.queue: asyncio.Queue[str | None | Exception] = asyncio.Queue()
        for request in requests or []:
            self.queue.put_nowait(request)
        if end:
            self.queue.put_nowait(None)
        self.pulled = 0
        self.in_flight_at_pull: list[int] = []
        self.pulled_event = asyncio.Event()

    def put(self, request: str | None | Exception) -> None:
        self.queue.put_nowait(request)

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        self.in_flight_at_pull.append(self.pulled - len(self.receiver.answers))
        item = await self.queue.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        self.pulled += 1
        self.pulled_event.set()
        return item


class Handler:
    """Each request's answer waits until the test releases it; "boom" raises, "sync-boom" raises before
    it can start, "error:<x>" answers its own error (what a transport's handler does with a failure)."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[str]] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, request: str) -> asyncio.Future[str] | asyncio.Task[str]:
        if request == "sync-boom":
            raise RuntimeError("no handler for that")
        return asyncio.ensure_future(self._handle(request))

    async def _handle(self, request: str) -> str:
        self.started.append(request)
        self.changed.set()
        if request.startswith("error:"):
            return f"{request[6:]}: ERROR"
        if request == "boom":
            raise RuntimeError("unexpected")
        future = self.waiting[request] = asyncio.get_running_loop().create_future()
        try:
            return await future
        except asyncio.CancelledError:
            self.cancelled.append(request)
            raise

    async def until_started(self, count: int) -> None:
        while len(self.started) < count:
            self.changed.clear()
            await self.changed.wait()

    def release(self, request: str) -> None:
        self.waiting.pop(request).set_result(f"{request}: OK")


class Receiver:
    """The answer side: records answers in the order they were sent."""

    def __init__(self, *, fail_on: str = "") -> None:
        self.answers: list[str] = []
        self.fail_on = fail_on
        self.changed = asyncio.Event()

    async def __call__(self, answer: str) -> None:
        if self.fail_on and answer.startswith(self.fail_on):
            raise ConnectionError("the peer's side is gone")
        self.answers.append(answer)
        self.changed.set()

    async def until_answered(self, count: int) -> None:
        while len(self.answers) < count:
            self.changed.clear()
            await self.changed.wait()


def unexpected(request: str, exc: BaseException) -> str:
    return f"{request}: INTERNAL"


async def test_answers_go_out_as_they_complete_not_in_request_order() -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "b", "c", "d"])
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8))
    await handler.until_started(4)

    for request, answered in (("c", 1), ("a", 2), ("d", 3), ("b", 4)):
        handler.release(request)
        await receiver.until_answered(answered)

    assert await run is True
    assert receiver.answers == ["c: OK", "a: OK", "d: OK", "b: OK"]


async def test_the_reader_stops_pulling_at_the_window_and_resumes_as_answers_go_out() -> None:
    receiver, handler = Receiver(), Handler()
    requests = [f"r{i}" for i in range(10)]
    sender = Sender(receiver, requests)
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=3))

    await handler.until_started(3)
    assert sender.pulled == 3  # the cap: a fourth is not read while three are in flight
    for answered, request in enumerate(requests, 1):
        handler.release(request)
        await receiver.until_answered(answered)
        await handler.until_started(min(answered + 3, len(requests)))
        assert sender.pulled == min(answered + 3, len(requests))

    assert await run is True
    # Every pull asked for the next request only with a place free; the window was used in full.
    assert max(sender.in_flight_at_pull) == 2
    assert sender.in_flight_at_pull[:3] == [0, 1, 2]
    assert len(receiver.answers) == len(requests)


async def test_a_request_that_fails_answers_its_own_error_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "error:b", "boom", "sync-boom", "c"])
    run = asyncio.create_task(
        answer_as_completed(sender, handler, receiver, window=8, on_unexpected=unexpected)
    )
    await receiver.until_answered(3)  # b's error, and the two unexpected failures answered INTERNAL
    assert sorted(receiver.answers) == ["b: ERROR", "boom: INTERNAL", "sync-boom: INTERNAL"]
    handler.release("a")
    handler.release("c")

    assert await run is True
    assert sorted(receiver.answers[3:]) == ["a: OK", "c: OK"]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2 and all(r.exc_info for r in failures)  # logged with their tracebacks


async def test_an_unexpected_failure_with_no_answer_for_it_is_logged_and_frees_its_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["boom", "a"])
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=1))
    await handler.until_started(2)  # boom's place came free without an answer, so "a" was read
    handler.release("a")

    assert await run is True
    assert receiver.answers == ["a: OK"]
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_the_request_side_ending_ends_the_stream_only_once_every_request_is_answered() -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "b", "c"])  # then the end of the request side
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8))
    await handler.until_started(3)
    handler.release("b")
    handler.release("a")
    await receiver.until_answered(2)
    assert not run.done()  # c is still open

    handler.release("c")
    assert await run is True
    assert receiver.answers == ["b: OK", "a: OK", "c: OK"]


async def test_cancelling_the_stream_cancels_every_request_in_flight() -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "b", "c"], end=False)
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8))
    await handler.until_started(3)

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert sorted(handler.cancelled) == ["a", "b", "c"]
    assert receiver.answers == []


async def test_a_broken_request_side_ends_the_stream_with_its_error_and_cancels_the_rest() -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "b"], end=False)
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8))
    await handler.until_started(2)

    sender.put(ConnectionResetError("the transport broke"))
    with pytest.raises(ConnectionResetError):
        await run
    assert sorted(handler.cancelled) == ["a", "b"]


async def test_a_failed_send_ends_the_stream_with_its_error_and_cancels_the_rest() -> None:
    receiver, handler = Receiver(fail_on="b"), Handler()
    sender = Sender(receiver, ["a", "b"], end=False)
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8))
    await handler.until_started(2)

    handler.release("b")
    with pytest.raises(ConnectionError):
        await run
    assert handler.cancelled == ["a"]


async def test_stop_takes_no_more_requests_but_answers_those_taken() -> None:
    receiver, handler = Receiver(), Handler()
    sender = Sender(receiver, ["a", "b"], end=False)
    stop = asyncio.Event()
    run = asyncio.create_task(answer_as_completed(sender, handler, receiver, window=8, stop=stop))
    await handler.until_started(2)

    stop.set()
    sender.put("c")  # written after the stop: never read
    handler.release("b")
    handler.release("a")
    assert await run is False  # stopped, not ended by the sender: the transport says so
    assert receiver.answers == ["b: OK", "a: OK"]
    assert handler.started == ["a", "b"]


async def test_a_window_below_one_is_refused() -> None:
    receiver = Receiver()
    with pytest.raises(ValueError, match="window"):
        await answer_as_completed(Sender(receiver, []), Handler(), receiver, window=0)


class ManyReceiver:
    """The answer side of ``send_many``: records each call's list of answers. While ``gate`` is
    closed a call waits (what a slow transport write does) and its answers count as sent only once
    it returns."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.answers: list[str] = []
        self.entered = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.changed = asyncio.Event()

    async def __call__(self, answers: list[str]) -> None:
        self.entered += 1
        self.changed.set()
        await self.gate.wait()
        self.calls.append(list(answers))
        self.answers.extend(answers)
        self.changed.set()

    async def until_answered(self, count: int) -> None:
        while len(self.answers) < count:
            self.changed.clear()
            await self.changed.wait()

    async def until_entered(self, count: int) -> None:
        """Until the ``count``-th call has begun (it may still be waiting on the gate)."""
        while self.entered < count:
            self.changed.clear()
            await self.changed.wait()


async def never_send(answer: str) -> None:
    raise AssertionError(f"send called with {answer!r} although send_many was given")


def answering_many(
    requests: list[str], *, window: int, on_unexpected: Callable[[str, BaseException], str] | None = None,
    linger_s: Callable[[], float] | None = None, most_packed: int = 0, end: bool = True,
) -> tuple[ManyReceiver, Handler, Sender, asyncio.Task[bool]]:
    """``answer_as_completed`` running over ``requests`` with ``send_many`` (and ``send`` never called)."""
    receiver, handler = ManyReceiver(), Handler()
    sender = Sender(receiver, requests, end=end)
    run = asyncio.create_task(answer_as_completed(
        sender, handler, never_send, window=window, on_unexpected=on_unexpected, send_many=receiver,
        linger_s=linger_s, most_packed=most_packed,
    ))
    return receiver, handler, sender, run


async def test_send_many_gets_the_answers_ready_together_in_one_call_each_answered_once() -> None:
    requests = [f"r{i}" for i in range(6)]
    receiver, handler, _, run = answering_many(requests, window=8)
    await handler.until_started(6)

    # Three complete in the same turn of the loop: one call carries all three.
    for request in ("r4", "r0", "r2"):
        handler.release(request)
    await receiver.until_answered(3)
    assert receiver.calls == [["r4: OK", "r0: OK", "r2: OK"]]  # in the order they completed

    # One alone: a list of one.
    handler.release("r1")
    await receiver.until_answered(4)
    assert receiver.calls[1] == ["r1: OK"]

    handler.release("r5")
    handler.release("r3")
    assert await run is True
    assert receiver.calls[2] == ["r5: OK", "r3: OK"]
    assert sorted(receiver.answers) == sorted(f"{r}: OK" for r in requests)  # each exactly once
    assert all(receiver.calls)  # never an empty list


async def test_send_many_carries_failures_answers_and_a_failure_with_no_answer_frees_its_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver, handler, _, run = answering_many(["boom", "error:b", "sync-boom", "lost", "a"], window=1,
                                               on_unexpected=unexpected)
    await handler.until_started(3)  # boom, b, lost (sync-boom never starts): each place came free
    handler.release("lost")
    await handler.until_started(4)
    handler.release("a")

    assert await run is True
    assert receiver.answers == ["boom: INTERNAL", "b: ERROR", "sync-boom: INTERNAL", "lost: OK", "a: OK"]
    assert all(len(call) == 1 for call in receiver.calls)  # window 1: never two ready at once
    assert sum(r.levelno == logging.ERROR for r in caplog.records) == 2

    # With no on_unexpected, a failure has no answer: send_many is not called for it, yet its place frees.
    receiver, handler, _, run = answering_many(["boom", "a"], window=1)
    await handler.until_started(2)
    handler.release("a")
    assert await run is True
    assert receiver.calls == [["a: OK"]]


async def test_with_send_many_the_window_still_bounds_requests_in_flight_until_the_call_returns() -> None:
    requests = [f"r{i}" for i in range(9)]
    receiver, handler, sender, run = answering_many(requests, window=3)
    await handler.until_started(3)
    assert sender.pulled == 3

    for batch in range(3):
        receiver.gate.clear()  # the transport is slow: the next call waits
        for request in requests[3 * batch: 3 * batch + 3]:
            handler.release(request)
        await receiver.until_entered(batch + 1)
        for _ in range(20):  # the reader gets every chance to run: the places are not free yet
            await asyncio.sleep(0)
        assert sender.pulled == 3 * batch + 3, "a request was taken while the answers holding its place were being sent"
        receiver.gate.set()
        await handler.until_started(min(3 * batch + 6, len(requests)))
        assert sender.pulled == min(3 * batch + 6, len(requests))

    assert await run is True
    assert receiver.calls == [[f"{r}: OK" for r in requests[i: i + 3]] for i in range(0, 9, 3)]
    assert max(sender.in_flight_at_pull) == 2  # a pull only ever came with a place free


HOUR_S = 3600.0
"""A linger no test waits out: an answer that went out came out for another reason than the time."""


async def test_an_answer_lingers_for_the_others_in_flight_and_they_go_in_one_message() -> None:
    receiver, handler, _, run = answering_many(["a", "b", "c"], window=8, linger_s=lambda: HOUR_S)
    await handler.until_started(3)
    handler.release("b")
    for _ in range(20):  # every chance to send: b waits for a and c, still in flight
        await asyncio.sleep(0)
    assert receiver.calls == []
    handler.release("a")
    for _ in range(20):
        await asyncio.sleep(0)
    assert receiver.calls == []
    handler.release("c")  # the last in flight: all go, at once
    assert await asyncio.wait_for(run, 5.0) is True
    assert receiver.calls == [["b: OK", "a: OK", "c: OK"]]


async def test_an_answer_with_nothing_else_in_flight_never_lingers() -> None:
    receiver, handler, sender, run = answering_many(["a"], window=8, linger_s=lambda: HOUR_S, end=False)
    await handler.until_started(1)
    handler.release("a")
    await asyncio.wait_for(receiver.until_answered(1), 5.0)  # an hour's linger would time this out
    sender.put("b")  # and the next, alone too
    await handler.until_started(2)
    handler.release("b")
    await asyncio.wait_for(receiver.until_answered(2), 5.0)
    sender.put(None)
    assert await asyncio.wait_for(run, 5.0) is True
    assert receiver.calls == [["a: OK"], ["b: OK"]]


async def test_a_linger_ends_at_its_time_or_once_enough_answers_are_ready() -> None:
    # The time: b's answer goes after at most the linger, though a is still in flight.
    receiver, handler, _, run = answering_many(["a", "b"], window=8, linger_s=lambda: 0.01)
    await handler.until_started(2)
    handler.release("b")
    await asyncio.wait_for(receiver.until_answered(1), 5.0)
    assert receiver.calls == [["b: OK"]]
    handler.release("a")
    assert await asyncio.wait_for(run, 5.0) is True
    assert receiver.calls == [["b: OK"], ["a: OK"]]

    # Enough company (most_packed): two ready of three in flight go at once, the third still out.
    receiver, handler, _, run = answering_many(["a", "b", "c"], window=8, linger_s=lambda: HOUR_S, most_packed=2)
    await handler.until_started(3)
    handler.release("c")
    for _ in range(20):
        await asyncio.sleep(0)
    assert receiver.calls == []
    handler.release("a")
    await asyncio.wait_for(receiver.until_answered(2), 5.0)
    assert receiver.calls == [["c: OK", "a: OK"]]
    handler.release("b")
    assert await asyncio.wait_for(run, 5.0) is True
    assert receiver.calls[1:] == [["b: OK"]]


async def test_no_linger_while_it_says_zero_and_cancelling_a_linger_cancels_the_requests_in_flight() -> None:
    receiver, handler, _, run = answering_many(["a", "b"], window=8, linger_s=lambda: 0.0)
    await handler.until_started(2)
    handler.release("b")
    await asyncio.wait_for(receiver.until_answered(1), 5.0)  # at once, a still in flight
    handler.release("a")
    assert await run is True
    assert receiver.calls == [["b: OK"], ["a: OK"]]

    receiver, handler, _, run = answering_many(["a", "b"], window=8, linger_s=lambda: HOUR_S)
    await handler.until_started(2)
    handler.release("b")  # b lingers for a
    for _ in range(20):
        await asyncio.sleep(0)
    run.cancel()  # the peer went away
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 5.0)
    assert handler.cancelled == ["a"]
    assert receiver.calls == []


async def test_answers_of_a_stream_whose_requests_finish_far_apart_never_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lingers an hour long, but only for requests finishing less than 1 ns apart: here never.
    monkeypatch.setattr(streaming, "COMPANY_GAPS", 1e-9 / HOUR_S)
    receiver, handler, _, run = answering_many(["a", "b", "c"], window=8, linger_s=lambda: HOUR_S)
    await handler.until_started(3)
    await asyncio.sleep(0.01)  # duration: the requests finish 10 ms apart at least, far apart for 1 ns
    handler.release("a")
    await asyncio.wait_for(receiver.until_answered(1), 5.0)  # b and c still in flight, yet a went at once
    await asyncio.sleep(0.01)  # duration: as above
    handler.release("b")
    await asyncio.wait_for(receiver.until_answered(2), 5.0)
    handler.release("c")
    assert await asyncio.wait_for(run, 5.0) is True
    assert receiver.calls == [["a: OK"], ["b: OK"], ["c: OK"]]

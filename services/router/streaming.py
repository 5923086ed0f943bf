"""Answering a stream of requests as each completes, with a bound on those in flight (no grpc here).

``answer_as_completed`` is the core of every streaming front door of the
router (``ClassifyStream``; KServe's ``ModelStreamInfer``): it reads the
stream's requests, runs ``handle`` for each as a task of its own, and sends
each answer as soon as it is ready, in whatever order they complete.

Flow control is the transport's: at most ``window`` requests are in flight
(taken and not yet answered); at the cap it stops reading, so the sender's
writes back up in the transport (HTTP/2 flow control) instead of in this
process's memory. A request counts until its answer has been sent, so a
caller that does not read its answers holds the window shut as well.

Errors: ``handle`` turns a request's own failure into that request's error
answer; the stream goes on. An exception that escapes ``handle`` anyway is
logged with its traceback and answered through ``on_unexpected`` when one is
given (the transport's generic INTERNAL answer); it never ends the stream.
A failure of the request side (the transport's reader) or of ``send`` ends
the stream: every request still in flight is cancelled and the error raised.
So does cancelling the caller (the peer went away).

Lingering (``linger_s``): a message costs a transport about the same CPU
whatever it packs (a gRPC write and its completion: tens of µs), so a
stream whose answers go out one or two a message spends most of its CPU on
messages. Answers ready while others of the same stream are still in
flight may wait a little for them (at most ``linger_s``; none once every
request in flight has its answer, so a lone request never waits) and go in
one message. At the router's ceiling that is more answers a message and
fewer messages back from the sender too (its next requests come together).
Only a stream whose requests have been finishing close together (a moving
average of the gaps under ``COMPANY_GAPS`` lingers) waits: where they come
far apart, company would seldom come in time and the wait be all latency.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

from flotilla.common.clock import MeanGap

log = logging.getLogger(__name__)

GAP_WEIGHT = 1 / 8
"""The weight of the latest gap between two finished requests of a stream in its moving average."""
COMPANY_GAPS = 2.0
"""Answers linger only on a stream whose requests have been finishing less than this many lingers
apart on average (at least half an answer expected to join): where they finish further apart (a
model's batches far apart, a sender with a request now and then), waiting would only add latency."""

T = TypeVar("T")  # a request
R = TypeVar("R")  # an answer


async def answer_as_completed(
    requests: AsyncIterator[T],
    handle: Callable[[T], Awaitable[R]],
    send: Callable[[R], Awaitable[None]],
    *,
    window: int,
    on_unexpected: Callable[[T, BaseException], R] | None = None,
    stop: asyncio.Event | None = None,
    send_many: Callable[[list[R]], Awaitable[None]] | None = None,
    linger_s: Callable[[], float] | None = None,
    most_packed: int = 0,
) -> bool:
    """Answer every request of ``requests`` with ``handle``'s answer, through ``send``, as each completes.

    At most ``window`` requests are in flight; at the cap no more are read
    until an answer has been sent. Returns True once the request side has
    ended and every request read is answered. Setting ``stop`` (shutting
    down) stops the reading at once: the requests already taken are still
    answered, then it returns False (requests the sender wrote after the last
    one taken were never read: a transport says so, so that they are resent).
    Cancelled, it cancels every request in flight.

    ``send_many``, when given, sends every answer ready at once in one go
    instead of ``send`` one by one (a transport that packs them into one
    message); their places in the window free up once it has sent them.

    ``linger_s`` (with ``send_many``): how long, now, answers ready while
    other requests of the stream are still in flight wait for company, so
    that they share one message (0: not at all): until every request in
    flight is answered, or ``most_packed`` answers are ready (0: no such
    cap), or the time is up. An answer with no request in flight beside it
    never waits, nor does one on a stream whose requests have been finishing
    further apart than ``COMPANY_GAPS`` lingers. See the module docstring.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    stream = _Stream(handle, window, on_unexpected)
    reader = asyncio.create_task(stream.read(requests), name="stream-read")
    reader.add_done_callback(stream.wake_up)
    stopper: asyncio.Task[None] | None = None
    if stop is not None:
        stopper = asyncio.create_task(_cancel_when_set(stop, reader), name="stream-stop")
    try:
        while True:
            if send_many is not None:
                if linger_s is not None and stream.finished and not stream.all_finished():
                    most_s = linger_s()
                    if most_s > 0 and stream.company_likely(most_s):
                        await stream.linger(most_s, most_packed)
                while stream.finished:
                    ready = [stream.finished.popleft() for _ in range(len(stream.finished))]
                    answers = [a for a in (stream.answer(*outcome) for outcome in ready) if a is not None]
                    if answers:
                        await send_many(answers)
                    stream.answered(len(ready))
            while stream.finished:
                answer = stream.answer(*stream.finished.popleft())
                if answer is not None:
                    await send(answer)
                stream.answered()
            if reader.done():
                failure = None if reader.cancelled() else reader.exception()
                if failure is not None:
                    raise failure  # the request side broke: the stream is over
                if stream.open == 0:
                    return not reader.cancelled()
            stream.wake.clear()
            await stream.wake.wait()
    finally:
        for task in (stopper, reader):
            if task is not None:
                task.cancel()
        await stream.cancel_all()
        # Their ends are awaited, their errors not raised again (the reader's was, above).
        await asyncio.gather(*(t for t in (stopper, reader) if t is not None), return_exceptions=True)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _cancel_when_set(stop: asyncio.Event, reader: asyncio.Task[None]) -> None:
    await stop.wait()
    reader.cancel()


class _Stream(Generic[T, R]):
    """One stream's requests in flight and the answers ready to send."""

    def __init__(
        self,
        handle: Callable[[T], Awaitable[R]],
        window: int,
        on_unexpected: Callable[[T, BaseException], R] | None,
    ) -> None:
        self.handle = handle
        self.window = window
        self.on_unexpected = on_unexpected
        self.open = 0
        """Requests taken and not yet answered (their answer not yet sent)."""
        self.tasks: set[asyncio.Future[R]] = set()
        self.finished: deque[tuple[T, asyncio.Future[R] | BaseException]] = deque()
        """Requests whose handling is over, in the order they completed, to answer."""
        self.wake = asyncio.Event()
        """Set when an answer is ready or the reader has ended."""
        self.slot = asyncio.Event()
        """Set when an answer has been sent (a place in the window may be free)."""
        self.company: asyncio.Future[None] | None = None
        """While answers linger: done once they have all the company they wait for."""
        self.company_size = 0
        """While answers linger: the answers ready that end the wait (0: only all of them, or the time)."""
        self.loop = asyncio.get_running_loop()
        self.finish_gaps = MeanGap(GAP_WEIGHT, since_s=self.loop.time())
        """How far apart the stream's requests have been finishing (the first gap from the stream's start)."""

    def wake_up(self, _: object = None) -> None:
        self.wake.set()

    async def read(self, requests: AsyncIterator[T]) -> None:
        # The next request is read only once a place is free: at the cap the transport holds the sender.
        async for request in requests:
            self.take(request)
            while self.open >= self.window:
                self.slot.clear()
                await self.slot.wait()

    def take(self, request: T) -> None:
        self.open += 1
        try:
            task = asyncio.ensure_future(self.handle(request))
        except Exception as exc:  # handle failed before it could start: still this request's answer
            self._finish(request, exc)
            return
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._done(request, done))

    def _done(self, request: T, task: asyncio.Future[R]) -> None:
        self.tasks.discard(task)
        self._finish(request, task)

    def _finish(self, request: T, outcome: asyncio.Future[R] | BaseException) -> None:
        self.finished.append((request, outcome))
        self.wake.set()
        self.finish_gaps.note(self.loop.time())
        company = self.company
        if company is not None and not company.done() and (
            self.all_finished() or 0 < self.company_size <= len(self.finished)
        ):
            company.set_result(None)

    def company_likely(self, most_s: float) -> bool:
        """Whether an answer that waits ``most_s`` is likely to get company: the stream's requests have
        been finishing, on average, less than ``COMPANY_GAPS`` times that apart."""
        return self.finish_gaps.mean_s < COMPANY_GAPS * most_s

    def all_finished(self) -> bool:
        """Every request taken and not yet answered has its answer ready."""
        return len(self.finished) >= self.open

    async def linger(self, most_s: float, most_packed: int) -> None:
        """Wait up to ``most_s`` for the requests in flight to finish too (or ``most_packed`` to be ready)."""
        company = self.company = self.loop.create_future()
        self.company_size = most_packed
        timer = self.loop.call_later(most_s, _settle, company)
        try:
            await company
        finally:
            timer.cancel()
            self.company = None

    def answer(self, request: T, outcome: asyncio.Future[R] | BaseException) -> R | None:
        """``handle``'s answer, or for an exception that escaped it: logged, then ``on_unexpected``'s (if any)."""
        if isinstance(outcome, BaseException):
            exc: BaseException = outcome
        elif outcome.cancelled():
            exc = asyncio.CancelledError("the request's handler was cancelled")
        else:
            failure = outcome.exception()
            if failure is None:
                return outcome.result()
            exc = failure
        log.error("stream: a request's handler failed unexpectedly", exc_info=exc)
        if self.on_unexpected is None:
            return None
        try:
            return self.on_unexpected(request, exc)
        except Exception:
            log.exception("stream: answering a failed request failed too; it goes unanswered")
            return None

    def answered(self, count: int = 1) -> None:
        self.open -= count
        self.slot.set()

    async def cancel_all(self) -> None:
        tasks, self.tasks = self.tasks, set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

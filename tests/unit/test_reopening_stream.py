"""``ReopeningStream`` (flotilla.clients.stream): one stream at a time for many requests, another
opened when one ends UNAVAILABLE, against stand-in streams that end or answer as a test says."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from flotilla.clients import stream as stream_module
from flotilla.clients.results import Classification
from flotilla.clients.stream import ClassifyStream, ReopeningStream
from flotilla.errors import Code, FlotillaError, NotFound, Unauthenticated, Unavailable, error_from_code


class Stand:
    """A stream whose requests are answered by ``script``: "ok", "end" (the stream ends UNAVAILABLE
    under them), "core" (it ends INTERNAL), "own" (an UNAVAILABLE answer of the request's own),
    "unauth" (the stream ends UNAUTHENTICATED), "missing" (the request's NOT_FOUND)."""

    def __init__(self, script: list[str], reopened: bool) -> None:
        self.script = script
        self.reopened = reopened
        self.ended: FlotillaError | None = None
        self.sent: list[tuple[str, float | None]] = []
        self.closed = self.cancelled = False

    async def classify(self, image_uuid: str, *, top_k: int = 5, timeout_s: float | None = None) -> Classification:
        if self.ended is not None:
            raise self.ended
        self.sent.append((image_uuid, timeout_s))
        outcome = self.script.pop(0)
        if outcome == "end":
            self.ended = Unavailable("router 127.0.0.1:1 is unavailable: Socket closed")
            raise self.ended
        if outcome == "unauth":
            self.ended = Unauthenticated("bad key")
            raise self.ended
        if outcome == "core":  # grpc.aio's status for a write that raced the connection's end
            self.ended = error_from_code(Code.INTERNAL, "Internal error from Core")
            raise self.ended
        if outcome == "own":
            raise Unavailable("no worker could be reached")
        if outcome == "missing":
            raise NotFound(f"image {image_uuid} not found")
        return Classification(image_uuid, "m", [])

    async def close(self) -> None:
        self.closed = True

    async def cancel(self) -> None:
        self.cancelled = True


class Opener:
    def __init__(self, *scripts: list[str]) -> None:
        self.scripts = list(scripts)
        self.streams: list[Stand] = []

    def __call__(self, reopened: bool) -> ClassifyStream:
        stand = Stand(self.scripts.pop(0), reopened)
        self.streams.append(stand)
        return cast(ClassifyStream, stand)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "REOPEN_BACKOFF_S", 0.001)
    monkeypatch.setattr(stream_module, "REOPEN_MAX_BACKOFF_S", 0.004)


async def test_a_request_its_stream_failed_by_ending_goes_again_on_a_new_stream() -> None:
    opener = Opener(["ok", "end"], ["core"], ["ok", "ok"])
    streams = ReopeningStream(opener, default_timeout_s=10)
    assert (await streams.classify("a")).image_uuid == "a"
    assert (await streams.classify("b")).image_uuid == "b", "sent again on each new stream until one answered"
    assert (await streams.classify("c")).image_uuid == "c", "the open stream serves the next request"
    assert [s.reopened for s in opener.streams] == [False, True, True], "a reopened stream may wait for the router"
    assert [[u for u, _ in s.sent] for s in opener.streams] == [["a", "b"], ["b"], ["b", "c"]]
    assert streams.opened == 3
    await streams.close()
    assert [s.cancelled for s in opener.streams[:2]] == [True, True] and opener.streams[2].closed


async def test_each_try_gets_what_is_left_of_the_requests_deadline_and_the_last_error_once_it_is_gone() -> None:
    opener = Opener(*(["end"] for _ in range(1000)))
    streams = ReopeningStream(opener, default_timeout_s=0.05)
    with pytest.raises(Unavailable, match="Socket closed"):
        await streams.classify("a")
    timeouts = [t for s in opener.streams for _, t in s.sent]
    assert timeouts[0] == 0.05 and len(timeouts) > 2
    assert all(later < earlier for earlier, later in zip(timeouts, timeouts[1:], strict=False)), timeouts
    assert timeouts[-1] > 0


@pytest.mark.parametrize(("outcome", "code"), [("own", "UNAVAILABLE"), ("missing", "NOT_FOUND"), ("unauth", "UNAUTHENTICATED")])
async def test_a_requests_own_error_or_a_stream_ended_otherwise_is_raised_as_it_came(outcome: str, code: str) -> None:
    opener = Opener([outcome], ["ok"])
    streams = ReopeningStream(opener, default_timeout_s=10)
    with pytest.raises(FlotillaError) as raised:
        await streams.classify("a")
    assert raised.value.code.name == code
    assert streams.opened == 1, "sent once"


async def test_with_reopening_off_the_streams_end_is_the_requests_error() -> None:
    opener = Opener(["end"], ["ok"])
    streams = ReopeningStream(opener, default_timeout_s=10, reopen=False)
    with pytest.raises(Unavailable):
        await streams.classify("a")
    assert streams.opened == 1
    assert (await streams.classify("b")).image_uuid == "b", "the next request opens a new stream"


async def test_requests_failed_together_by_one_end_share_the_next_stream() -> None:
    opener = Opener(["end"], ["ok"] * 9)
    streams = ReopeningStream(opener, default_timeout_s=10)
    results = await asyncio.gather(*(streams.classify(str(i)) for i in range(9)))
    assert sorted(r.image_uuid for r in results) == sorted(str(i) for i in range(9))
    assert streams.opened == 2, "one new stream for every request the first one's end failed"
    await streams.cancel()
    assert all(s.cancelled for s in opener.streams)

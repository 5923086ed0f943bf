"""A burst several times the admission limits gets only documented statuses.

gRPC core used to cancel calls that a busy asyncio server had not picked up
yet (beyond 1000 pending), with a bare CANCELLED the callers never asked
for and no log line. Admission is now Flotilla's: every call gets its
answer, RESOURCE_EXHAUSTED naming the limit, or (not here) a deadline or
UNAVAILABLE status.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from flotilla.clients.client import FlotillaClient
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MODEL, sample

BURST = 3000  # about 3x the model's queue (max_queue_size 1024)


async def test_a_burst_gets_answers_or_resource_exhausted_never_cancelled(
    stack: LocalStack, client: FlotillaClient
) -> None:
    uuid = await client.upload(sample("coffee.jpg"))

    async def one(i: int) -> tuple[str, str, str]:
        try:
            result = await client.classify(uuid, MODEL, timeout_s=120, request_id=f"burst-{i}")
        except FlotillaError as exc:
            return exc.code.name, exc.message, ""
        return Code.OK.name, "", result.request_id

    answers = await asyncio.gather(*(one(i) for i in range(BURST)))

    codes = Counter(code for code, _, _ in answers)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] > 0, "the burst must exceed the limits to test them"
    assert codes["OK"] >= 1024, codes  # at least a whole queue's worth was admitted and answered
    for code, message, _ in answers:
        if code == "RESOURCE_EXHAUSTED":
            assert "max_queue_size" in message or "max_concurrent_calls" in message, message
            assert "retry after" in message, message
    answered = [request_id for code, _, request_id in answers if code == "OK"]
    assert len(answered) == len(set(answered)) == codes["OK"], "each accepted request answered once, as itself"
    # The stack is still serving.
    assert (await client.classify(uuid, MODEL, timeout_s=30)).classes[0].label == "espresso"

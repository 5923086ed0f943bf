"""The bench's stream load: each closed-loop caller keeps to one stream (``StreamLoad``)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from flotilla.bench.front_loads import StreamLoad


class RecordingStream:
    """Stands in for one gRPC stream: answers every request at once, records who sent it."""

    def __init__(self, sent: dict[int, set[str]], index: int) -> None:
        self.sent, self.index = sent, index

    async def request(self, request_id: str, body: bytes) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sent[self.index].add(task.get_name())
        await asyncio.sleep(0)

    async def close(self) -> None:
        pass


async def test_each_caller_sends_on_its_own_stream_and_callers_are_dealt_out_over_the_streams() -> None:
    load = StreamLoad("127.0.0.1:1", 2, "/x.Y/Z", (), lambda request_id: b"", lambda raw: [])
    sent: dict[int, set[str]] = defaultdict(set)
    load._streams = [RecordingStream(sent, i) for i in range(2)]  # type: ignore[list-item]

    async def caller() -> None:
        for _ in range(5):
            await load()

    await asyncio.gather(*(asyncio.create_task(caller(), name=f"caller {i}") for i in range(3)))
    assert sent == {0: {"caller 0", "caller 2"}, 1: {"caller 1"}}
    await load.close()

"""Traces across the real tiers: one trace per request, a batch span linked to its riders.

A stack with tracing on and the file exporter (each service appends its
spans as JSON lines to <run_dir>/traces/<service>.jsonl); four concurrent
requests share batches, then the spans of all processes are put together.
The mesh's polling (batchers re-registering every second, the controller
reading their statistics) ran all along and left no trace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flotilla.clients.client import FlotillaClient
from flotilla.common.tracing import POLLING_METHODS
from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL, sample, stack_settings
from tests.waiting import until

REQUESTS = 4


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(tmp_path_factory.mktemp("traced"), triton={"replicas": 1})
    settings.observability.tracing = True
    settings.observability.trace_exporter = "file"
    settings.models[MODEL].batching.max_queue_delay_us = 50_000  # the four requests share batches
    with LocalStack(settings) as stack:
        yield stack


def spans(directory: Path) -> list[dict]:  # type: ignore[type-arg]
    found = []
    for path in directory.glob("*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


async def test_a_batched_request_is_one_trace_and_its_batch_links_to_it(traced: LocalStack) -> None:
    assert traced.state is not None and traced.settings is not None
    async with FlotillaClient(traced.state.router, API_KEY, traced.settings.s3) as client:
        uuid = await client.upload(sample("chelsea.jpg"))
        await asyncio.gather(*(client.classify(uuid, MODEL, timeout_s=30) for _ in range(REQUESTS)))

    directory = traced.run_dir / "traces"

    def written(name: str) -> int:
        return sum(s["name"] == name for s in spans(directory))

    # Spans are written as they end; the batcher's may trail its reply by a moment.
    await until(lambda: written("router Classify") >= REQUESTS and written("batcher Classify") >= REQUESTS, 10,
                "every router and batcher span written", interval_s=0.2)
    found = spans(directory)
    routers = [s for s in found if s["name"] == "router Classify"]
    by_id = {s["context"]["span_id"]: s for s in found}

    for router in routers:
        trace_id = router["context"]["trace_id"]
        [request] = [s for s in found if s["name"] == "batcher Classify" and s["parent_id"] == router["context"]["span_id"]]
        assert request["context"]["trace_id"] == trace_id, "router and batcher spans are one trace"
        assert request["attributes"]["flotilla.model"] == MODEL
        [batch] = [s for s in found if s["name"] == f"batch {MODEL}"
                   and any(link["context"]["span_id"] == request["context"]["span_id"] for link in s["links"])]
        assert batch["attributes"]["flotilla.batch_size"] == len(batch["links"])
        assert batch["attributes"]["flotilla.replica"] == traced.tritons[0].address
        assert batch["attributes"]["flotilla.worker"] == traced.preprocess[0].address
        assert batch["attributes"]["flotilla.model_version"] == 1, "the default version, resolved (not 0)"
        [worker] = [s for s in found if s["parent_id"] == batch["context"]["span_id"]]
        assert worker["name"] == "preprocess ProcessBatch"
        children = [s for s in found if s["parent_id"] == worker["context"]["span_id"]]
        fetches = [s for s in children if s["name"] == "fetch"]
        assert [s["attributes"]["flotilla.image_uuid"] for s in fetches] == [uuid] * len(batch["links"])
        assert all(s["kind"] == "SpanKind.CLIENT" for s in fetches)
        decodes = [s for s in children if s["name"] == "decode"]
        assert sum(s["attributes"]["flotilla.images"] for s in decodes) == len(batch["links"])
        [backend] = [s for s in children if s["name"] not in ("fetch", "decode")]
        assert backend["name"] == f"triton {MODEL}" and backend["kind"] == "SpanKind.CLIENT"
        assert backend["attributes"]["flotilla.replica"] == traced.tritons[0].address
        assert backend["attributes"]["flotilla.model_version"] == 1
        assert by_id[backend["parent_id"]]["context"]["trace_id"] == batch["context"]["trace_id"]
    batches = {s["context"]["span_id"] for s in found if s["name"] == f"batch {MODEL}"}
    assert len(batches) < REQUESTS, "the requests shared batches"
    polls = sorted({s["name"] for s in found if s["name"].rsplit(" ", 1)[-1] in POLLING_METHODS})
    assert not polls, f"polling started traces: {polls}"

"""flotilla top on the real stack: what it shows agrees with the traffic sent."""

from __future__ import annotations

import asyncio
import sys

import pytest

from flotilla.clients import top
from flotilla.clients.client import FlotillaClient
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MAX_BATCH_SIZE, MODEL, REPO, sample

N_REQUESTS = 12


def stack_targets(stack: LocalStack) -> top.Targets:
    assert stack.state is not None
    return top.Targets(stack.run_dir / top.TARGETS_FILE, stack.state.metrics)


async def test_top_counts_the_requests_sent_between_two_scrapes(client: FlotillaClient, stack: LocalStack) -> None:
    targets = stack_targets(stack)
    image_uuid = await client.upload(sample("chelsea.jpg"))
    before = await asyncio.to_thread(top.scrape, targets.current())
    await asyncio.gather(*(client.classify(image_uuid, MODEL) for _ in range(N_REQUESTS)))
    after = await asyncio.to_thread(top.scrape, targets.current())

    assert "router" in after.targets, after.failed
    row = next(r for r in top.model_rows(before, after) if r.model == MODEL)
    interval_s = after.time_s - before.time_s
    assert row.requests_per_s is not None and row.requests_per_s * interval_s == pytest.approx(N_REQUESTS)
    assert row.errors_per_s == 0
    assert row.p50_s is not None and row.p99_s is not None and 0 < row.p50_s <= row.p99_s
    # the batching tier: every request rode in exactly one batch, none larger than the limit
    assert row.mean_batch is not None and 1 <= row.mean_batch <= MAX_BATCH_SIZE
    items = top.increase(before, after)[top.BATCH_ITEMS]
    assert sum(v for labels, v in items.items() if dict(labels)["model"] == MODEL) == N_REQUESTS
    assert row.queue_depth == 0  # everything sent was answered
    assert row.queue_wait_p99_s is not None


async def test_flotilla_top_once_prints_a_frame_with_the_model_busy(client: FlotillaClient, stack: LocalStack) -> None:
    image_uuid = await client.upload(sample("coffee.jpg"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flotilla", "top", "--once", "--interval-s", "1.0",
        "--state", str(stack.run_dir / "stack.json"),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    output = asyncio.ensure_future(proc.communicate())
    sent = 0
    while not output.done():  # keep the model busy until top has taken both scrapes
        await asyncio.gather(*(client.classify(image_uuid, MODEL) for _ in range(4)))
        sent += 4
    stdout, stderr = await output
    text = stdout.decode()
    assert proc.returncode == 0, stderr.decode()
    assert sent > 0
    lines = text.splitlines()
    assert "targets scraped" in lines[0] and "\x1b[" not in text  # --once prints a plain frame
    header = next(line for line in lines if line.startswith("MODEL"))
    row = next(line for line in lines if line.startswith(MODEL + " "))
    rate = row[: header.index("REQ/S") + len("REQ/S")].split()[-1]
    assert float(rate) > 0, text
    assert any(line.startswith("REPLICA") for line in lines)

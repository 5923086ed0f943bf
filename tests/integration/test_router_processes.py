"""Several router processes on one port (router.processes, SO_REUSEPORT): the
kernel spreads client connections across them, each serves, and losing one
leaves the port served by the others."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from flotilla.clients.client import FlotillaClient
from flotilla.clients.top import REQUESTS, scrape
from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL, sample, stack_settings
from tests.waiting import until

CLIENTS = 16


@pytest.fixture(scope="module")
def two_routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("routers"), router={"api_keys": [API_KEY], "processes": 2}, triton={"replicas": 1}
    )
    with LocalStack(settings) as stack:
        yield stack


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:``port`` (one per router process), from /proc/net/tcp{,6}
    (gRPC may listen on an IPv6 socket with the IPv4-mapped address)."""
    addresses = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    rows = [row.split() for table in ("tcp", "tcp6") for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1] in addresses and row[3] == "0A")  # 0A: LISTEN


def served_ok(stack: LocalStack) -> dict[str, float]:
    """Classify calls each router process answered OK, from its own metrics endpoint."""
    targets = {p.name: p.metrics_address for p in stack.routers if p.metrics_address}
    result = scrape(targets)
    assert not result.failed, result.failed
    return {
        name: sum(v for labels, v in samples.get(REQUESTS, {}).items()
                  if dict(labels).get("method") == "Classify" and dict(labels).get("code") == "OK")
        for name, samples in result.targets.items()
    }


async def classify_from_many_connections(stack: LocalStack, uuid: str, calls_each: int = 2) -> None:
    assert stack.state is not None and stack.settings is not None

    async def one_client() -> None:
        async with FlotillaClient(
            stack.state.router, API_KEY, stack.settings.s3, own_connection=True  # type: ignore[union-attr]
        ) as client:
            for _ in range(calls_each):
                reply = await client.classify(uuid, MODEL, timeout_s=30)
                assert reply.classes

    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))


async def test_router_processes_share_one_port_and_each_serves(two_routers: LocalStack) -> None:
    routers = two_routers.routers
    assert len(routers) == 2 and len({p.address for p in routers}) == 1
    assert routers[0].pid != routers[1].pid
    assert two_routers.state is not None and two_routers.settings is not None
    async with FlotillaClient(two_routers.state.router, API_KEY, two_routers.settings.s3) as client:
        uuid = await client.upload(sample("chelsea.jpg"))
    before = served_ok(two_routers)

    await classify_from_many_connections(two_routers, uuid)

    after = served_ok(two_routers)
    gained = {name: after[name] - before.get(name, 0.0) for name in after}
    assert sum(gained.values()) == CLIENTS * 2, gained
    assert all(n > 0 for n in gained.values()), f"one process took every connection: {gained}"


async def test_the_port_stays_served_when_one_router_process_dies(two_routers: LocalStack) -> None:
    assert two_routers.state is not None and two_routers.settings is not None
    async with FlotillaClient(two_routers.state.router, API_KEY, two_routers.settings.s3) as client:
        uuid = await client.upload(sample("chelsea.jpg"))
    victim = two_routers.routers[1]
    pid = victim.pid
    assert pid is not None
    port = int(victim.address.rsplit(":", 1)[1])
    assert listeners(port) == 2
    os.kill(pid, signal.SIGKILL)
    # Once its listening socket is closed (the last of its threads gone, after it shows as a zombie) it
    # leaves the port's group; connections it had accepted but not taken are reset with it.
    await until(lambda: listeners(port) == 1, 10, "the killed router out of the port's group")

    await classify_from_many_connections(two_routers, uuid)  # new connections: all to the survivor

"""DnsEndpointSource: re-resolution, change detection, failures, the loop on a fake clock."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from fakes import FakeClock, settle

from flotilla.pool.discovery import DnsEndpoints, DnsEndpointSource


class FakeResolver:
    """Answers with ``answer`` (a list of IPs, or an OSError to raise); records each lookup."""

    def __init__(self, answer: Sequence[str] | OSError = ()) -> None:
        self.answer = answer
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append((host, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


def recorder() -> tuple[list[list[str]], object]:
    seen: list[list[str]] = []
    return seen, seen.append


async def test_reports_sorted_unique_addresses_only_when_they_change() -> None:
    resolver = FakeResolver(["10.0.0.2", "10.0.0.1", "10.0.0.2"])
    seen, on_change = recorder()
    source = DnsEndpointSource("preprocess.flotilla.svc:50053", on_change, resolver=resolver)  # type: ignore[arg-type]

    assert await source.refresh() is True
    assert await source.refresh() is False
    resolver.answer = ["10.0.0.3", "10.0.0.1"]
    assert await source.refresh() is True

    assert resolver.lookups[0] == ("preprocess.flotilla.svc", 50053)
    assert seen == [["10.0.0.1:50053", "10.0.0.2:50053"], ["10.0.0.1:50053", "10.0.0.3:50053"]]
    assert source.addresses == ["10.0.0.1:50053", "10.0.0.3:50053"]


async def test_a_failed_resolution_keeps_the_last_list_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flotilla.pool.discovery")
    resolver = FakeResolver(["10.0.0.1"])
    seen, on_change = recorder()
    source = DnsEndpointSource("batcher-m.flotilla.svc:50052", on_change, resolver=resolver)  # type: ignore[arg-type]
    await source.refresh()

    resolver.answer = OSError("Name or service not known")
    assert await source.refresh() is False
    assert await source.refresh() is False
    assert source.addresses == ["10.0.0.1:50052"]
    assert seen == [["10.0.0.1:50052"]]
    assert sum("cannot resolve" in r.message for r in caplog.records) == 1

    resolver.answer = ["10.0.0.1"]
    assert await source.refresh() is False  # same list: recovered, nothing to report
    assert any("resolves again" in r.message for r in caplog.records)


async def test_an_async_callback_is_awaited() -> None:
    applied: list[list[str]] = []

    async def apply(addresses: list[str]) -> None:
        applied.append(addresses)

    source = DnsEndpointSource("h:1", apply, resolver=FakeResolver(["10.0.0.1"]))
    await source.refresh()
    assert applied == [["10.0.0.1:1"]]


async def test_the_loop_resolves_every_interval_until_stopped() -> None:
    clock = FakeClock()
    resolver = FakeResolver(["10.0.0.1"])
    seen, on_change = recorder()
    source = DnsEndpointSource("h:9", on_change, interval_s=5.0, resolver=resolver, clock=clock)  # type: ignore[arg-type]

    source.start()
    await settle()
    assert len(resolver.lookups) == 1 and seen == [["10.0.0.1:9"]]

    resolver.answer = ["10.0.0.1", "10.0.0.2"]
    await clock.advance(4.9)
    assert len(resolver.lookups) == 1
    await clock.advance(0.1)
    assert len(resolver.lookups) == 2
    assert seen[-1] == ["10.0.0.1:9", "10.0.0.2:9"]

    await source.stop()
    await clock.advance(10.0)
    assert len(resolver.lookups) == 2


async def test_a_failing_callback_does_not_end_the_loop() -> None:
    clock = FakeClock()
    resolver = FakeResolver(["10.0.0.1"])
    calls: list[list[str]] = []

    def explode(addresses: list[str]) -> None:
        calls.append(addresses)
        raise RuntimeError("pool rejected the update")

    source = DnsEndpointSource("h:9", explode, interval_s=1.0, resolver=resolver, clock=clock)
    source.start()
    await settle()
    resolver.answer = ["10.0.0.2"]
    await clock.advance(1.0)
    assert calls == [["10.0.0.1:9"], ["10.0.0.2:9"]]
    await source.stop()


async def test_the_default_resolver_resolves_localhost() -> None:
    seen, on_change = recorder()
    source = DnsEndpointSource("localhost:50053", on_change)  # type: ignore[arg-type]
    assert await source.refresh() is True
    assert any(a in ("127.0.0.1:50053", "[::1]:50053") for a in source.addresses)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        DnsEndpointSource("h:1", lambda _: None, interval_s=0)


async def test_several_names_report_the_union_of_their_addresses() -> None:
    clock = FakeClock()
    answers = {"a": ["10.0.0.2", "10.0.0.1"], "b": ["10.0.0.3"]}

    async def resolver(host: str, port: int) -> Sequence[str]:
        return answers[host]

    seen, on_change = recorder()
    endpoints = DnsEndpoints(["a:1", "b:1", "a:1"], on_change, interval_s=1.0, resolver=resolver, clock=clock)  # type: ignore[arg-type]
    await endpoints.start()  # every name resolved before start returns
    assert endpoints.targets == ["a:1", "b:1"]
    assert endpoints.addresses == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]

    answers["b"] = ["10.0.0.1"]  # b's pod moved behind a's address: the union shrinks
    await clock.advance(1.0)
    assert seen[-1] == ["10.0.0.1:1", "10.0.0.2:1"]
    await endpoints.stop()


async def test_a_pool_following_dns_holds_one_endpoint_per_pod_and_closes_the_ones_that_leave() -> None:
    from flotilla.pool.discovery import pool_following
    from flotilla.pool.pool import EndpointPool

    answers = {"workers.ns.svc": ["10.0.0.2", "10.0.0.1"]}

    async def resolver(host: str, port: int) -> list[str]:
        return answers[host]

    closed: list[str] = []

    async def close(client: str) -> None:
        closed.append(client)

    pool: EndpointPool[str] = EndpointPool("workers", {})
    following = await pool_following(pool, ["workers.ns.svc:50053"], lambda a: f"client {a}", close,
                                     interval_s=3600, resolver=resolver)
    try:
        assert [e.address for e in pool.endpoints] == ["10.0.0.1:50053", "10.0.0.2:50053"]
        kept = pool.endpoints[1]
        answers["workers.ns.svc"] = ["10.0.0.2", "10.0.0.3"]  # one pod gone, one new
        await following.sources[0].refresh()
        assert [e.address for e in pool.endpoints] == ["10.0.0.2:50053", "10.0.0.3:50053"]
        assert pool.endpoints[0] is kept, "a pod that stays keeps its endpoint state"
        assert closed == ["client 10.0.0.1:50053"]
    finally:
        await following.stop()

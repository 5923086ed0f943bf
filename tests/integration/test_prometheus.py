"""A real Prometheus scraping the real stack, checked through its HTTP query API.

A dedicated stack with ``observability.prometheus`` on (a short scrape
interval): EfficientNet-Lite0, and the document-orientation model with
min_copies 0 so that one request makes a cold start. Known traffic goes
through the router in one burst; then Prometheus's numbers must agree with
it (requests by code at the router and the batcher, S3 misses, and their
increase over a window: the series existed at 0 before the burst) and with
the batcher's own GetStats (batches, requests), every target is up, the
rules file is loaded, and every dashboard panel expression and every alert
expression returns data.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc
from flotilla.clients.client import FlotillaClient
from flotilla.common.metrics import REQUEST_PATH
from flotilla.errors import FlotillaError
from flotilla.modelbuild.catalog import DOCUMENT_ORIENTATION
from flotilla.stack.local import LocalStack
from flotilla.stack.processes import wait_until
from flotilla.stack.prometheus import prometheus_ready
from tests.integration.conftest import API_KEY, MODEL, sample, stack_settings
from tests.test_observability_rules import (
    dashboard_exprs,
    rules,
    split_set_operands,
    variable_queries,
    watched_signal,
)
from tests.waiting import until

COLD = DOCUMENT_ORIENTATION  # min_copies 0: its first request is a cold start
SCRAPE_INTERVAL_S = 0.5
GOOD, MISSING, MALFORMED = 12, 3, 2
# What Grafana's $__rate_interval becomes here: several scrapes, and the whole test's traffic.
RATE_WINDOW = "1m"
# A window that holds the whole burst and samples from before it (the cold start takes a while).
INCREASE_WINDOW = "10m"
MODELS = f"({MODEL}|{COLD})"  # $model with both selected, as Grafana writes a multi-value regex
SCRAPED_TIMEOUT_S = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class Traffic:
    """Classify calls sent to MODEL, by the code the client got."""

    by_code: dict[str, int]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("prometheus"),
        models=(MODEL, COLD),
        observability={"prometheus": True, "prometheus_scrape_interval_s": SCRAPE_INTERVAL_S},
    )
    with LocalStack(settings) as stack:
        server = stack.prometheus
        assert server is not None
        wait_until(lambda: prometheus_ready(server.address), 60, "Prometheus", procs=[server])
        yield stack


@pytest.fixture(scope="module")
async def traffic(observed: LocalStack) -> AsyncIterator[Traffic]:
    """GOOD classifications, MISSING never-uploaded images, MALFORMED uuids, all at once; one cold start of COLD.

    Nothing goes first to give Prometheus a baseline: a counter's first scraped sample is its baseline,
    and every code's series exists at 0 from the moment the router and the batcher learn the model
    (``metrics.models_served``). The fixture waits until Prometheus has scraped them at 0.
    """
    assert observed.state is not None and observed.settings is not None
    state, s3 = observed.state, observed.settings.s3
    zeros = {(tier, code): 0.0 for tier in ("router", "batcher") for code in REQUEST_PATH[tier][1]}
    scraped = await settled(lambda: classify_codes(observed), zeros)
    assert scraped == zeros, "every code's series at 0 before any call"
    async with FlotillaClient(state.router, API_KEY, s3, transparent_retries=False) as client:
        image = await client.upload(sample("coffee.jpg"))
        calls = [client.classify(image, MODEL) for _ in range(GOOD)]
        calls += [client.classify(str(uuid.uuid4()), MODEL) for _ in range(MISSING)]
        calls += [client.classify(f"../not-a-uuid-{uuid.uuid4()}", MODEL) for _ in range(MALFORMED)]
        by_code: dict[str, int] = {}
        for result in await asyncio.gather(*calls, return_exceptions=True):
            assert not isinstance(result, BaseException) or isinstance(result, FlotillaError), result
            code = result.code.name if isinstance(result, FlotillaError) else "OK"
            by_code[code] = by_code.get(code, 0) + 1
        assert by_code == {"OK": GOOD, "NOT_FOUND": MISSING, "INVALID_ARGUMENT": MALFORMED}, by_code
        await client.classify(await client.upload(sample("chelsea.jpg")), COLD, timeout_s=120)
    yield Traffic(by_code)


# -- Prometheus's HTTP API ------------------------------------------------------------


def api(stack: LocalStack, path: str, **params: str) -> Any:
    """GET /api/v1/<path>; the ``data`` of a successful reply (the error text otherwise)."""
    assert stack.prometheus is not None
    url = f"http://{stack.prometheus.address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
    except urllib.error.HTTPError as exc:  # 400 for a query Prometheus cannot parse
        raise AssertionError(f"{path} {params}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    assert body["status"] == "success", body
    return body["data"]


def query(stack: LocalStack, promql: str) -> list[dict[str, Any]]:
    """An instant query now: its series (``metric`` labels, ``value`` [time, "text"])."""
    data = api(stack, "query", query=promql)
    assert data["resultType"] == "vector", data
    return list(data["result"])


def by_labels(stack: LocalStack, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s["metric"].get(n, "") for n in labels): float(s["value"][1]) for s in query(stack, promql)}


async def settled(read: Callable[[], T], want: Callable[[], Awaitable[object]] | object) -> T:
    """``read()`` once it equals ``want`` (a value, or an async function read each time), or the
    last reading after SCRAPED_TIMEOUT_S: Prometheus sees a change only at its next scrape."""
    readings: list[T] = []

    async def equal() -> bool:
        expected = await want() if callable(want) else want  # type: ignore[operator]
        readings.append(await asyncio.to_thread(read))
        return readings[-1] == expected

    try:
        await until(equal, SCRAPED_TIMEOUT_S, "the scraped value", interval_s=SCRAPE_INTERVAL_S)
    except AssertionError:
        pass  # the caller compares the last reading, with its own message
    return readings[-1]


def classify_codes(stack: LocalStack, over: str = "") -> dict[tuple[str, str], float]:
    """Classify calls for MODEL at the router and the batcher by (tier, code), as Prometheus last scraped
    them; with ``over`` (a window) their increase() over it."""
    selector = f'flotilla_grpc_requests_total{{tier=~"router|batcher", method="Classify", model="{MODEL}"}}'
    if over:
        selector = f"increase({selector}[{over}])"
    return by_labels(stack, f"sum by (tier, code) ({selector})", "tier", "code")  # type: ignore[return-value]


def instantiate(expr: str) -> str:
    """A dashboard expression as Grafana sends it with both models selected."""
    for variable, value in (("$__rate_interval", RATE_WINDOW), ("${model}", MODELS), ("$model", MODELS)):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a template variable is left in {expr!r}"
    return expr


# -- the tests ------------------------------------------------------------------------------


def test_every_target_is_scraped_with_its_process_and_tier(observed: LocalStack) -> None:
    def targets() -> dict[str, dict[str, Any]]:
        active = api(observed, "targets", state="active")["activeTargets"]
        return {t["labels"].get("process", ""): t for t in active}

    wanted = set(observed.metrics_targets())
    assert {"controller", "router", "prometheus", *(p.name for p in observed.shards),
            *(p.name for p in observed.tritons), *(p.name for p in observed.preprocess)} <= wanted
    assert observed.shards, "the batching shards are targets too"

    def all_up() -> bool:
        found = targets()
        return wanted <= set(found) and all(found[name]["health"] == "up" for name in wanted)

    try:
        wait_until(all_up, SCRAPED_TIMEOUT_S, "every target up")
    except TimeoutError:
        found = targets()
        health = {name: (t["health"], t.get("lastError")) for name, t in found.items()}
        pytest.fail(f"targets (health, last error): {health}; wanted {sorted(wanted)}")
    for name, target in targets().items():
        assert target["labels"]["tier"] and target["labels"]["job"] == "flotilla", (name, target["labels"])


def test_rules_file_is_loaded_and_healthy(observed: LocalStack) -> None:
    loaded = {
        rule["name"]: rule
        for group in api(observed, "rules")["groups"]
        for rule in group["rules"]
    }
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert name in loaded, f"{name} is not loaded; Prometheus has {sorted(loaded)}"
        assert loaded[name]["health"] != "err", (name, loaded[name].get("lastError"))


async def test_request_counters_agree_with_the_traffic(observed: LocalStack, traffic: Traffic) -> None:
    promql = f'sum by (tier, code) (flotilla_grpc_requests_total{{method="Classify", model="{MODEL}"}})'
    want = {(tier, code): float(n) for tier in ("router", "batcher") for code, n in traffic.by_code.items()}
    got = await settled(lambda: {k: v for k, v in by_labels(observed, promql, "tier", "code").items() if v}, want)
    assert got == want  # and every other code at 0 (the fixture saw them)

    missing = 'sum(flotilla_s3_errors_total{operation="get", kind="not_found"})'
    assert await settled(lambda: by_labels(observed, missing), {(): float(MISSING)}) == {(): float(MISSING)}


async def test_a_short_burst_of_errors_shows_in_increase(observed: LocalStack, traffic: Traffic) -> None:
    """The burst's codes in increase() over a window that holds it: each at least what was sent (Prometheus
    extrapolates to the window's ends, never below the counted difference). Had a code's series been
    born with the burst, its first sample would be the burst and increase() would read 0."""
    totals = {(tier, code): float(n) for tier in ("router", "batcher") for code, n in traffic.by_code.items()}
    scraped = await settled(lambda: {k: v for k, v in classify_codes(observed).items() if v}, totals)
    assert scraped == totals
    increased = await asyncio.to_thread(classify_codes, observed, INCREASE_WINDOW)
    short = {key: increased.get(key, 0.0) for key, n in totals.items() if increased.get(key, 0.0) < n}
    assert not short, f"increase() over {INCREASE_WINDOW} below the calls sent: {short}, sent {totals}"
    assert all(value == 0 for key, value in increased.items() if key not in totals), increased

    missing = f'sum(increase(flotilla_s3_errors_total{{operation="get", kind="not_found"}}[{INCREASE_WINDOW}]))'
    assert by_labels(observed, missing)[()] >= MISSING


async def test_batches_agree_with_the_batchers_own_stats(observed: LocalStack, traffic: Traffic) -> None:
    async with grpc.aio.insecure_channel(observed.batchers[MODEL].address) as channel:
        admin = batcher_pb2_grpc.BatcherAdminStub(channel)

        async def stats() -> dict[str, float]:
            reply = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))
            return {"batches": float(reply.batches), "requests": float(reply.requests)}

        def scraped() -> dict[str, float]:
            metrics = {"batches": "flotilla_batcher_batches_total", "requests": "flotilla_batcher_batch_items_total"}
            return {
                key: by_labels(observed, f'sum({metric}{{model="{MODEL}"}})').get((), -1.0)
                for key, metric in metrics.items()
            }

        got = await settled(scraped, stats)
        expected = await stats()
    assert got == expected
    # The malformed uuids never reach the queue; the missing images ride in batches and fail there.
    assert expected["requests"] == GOOD + MISSING
    assert 1 <= expected["batches"] < GOOD + MISSING, "no batching at all"


def without_data(stack: LocalStack, exprs: dict[str, str]) -> dict[str, str]:
    """Those of ``exprs`` that return no series now."""
    return {where: expr for where, expr in exprs.items() if not query(stack, expr)}


async def test_every_dashboard_expression_returns_data(observed: LocalStack, traffic: Traffic) -> None:
    # A series first scraped just now has one sample: a rate needs two (the next scrape).
    exprs = {where: instantiate(expr) for where, expr in dashboard_exprs().items()}
    empty = await settled(lambda: without_data(observed, exprs), {})
    assert not empty, f"panel expressions with no data: {json.dumps(empty, indent=2)}"


def test_the_model_variable_lists_the_models(observed: LocalStack) -> None:
    selector, label = variable_queries()["model"]
    values = api(observed, f"label/{label}/values", **{"match[]": selector})
    assert {MODEL, COLD} <= set(values), values


async def test_every_rule_expression_returns_data(observed: LocalStack, traffic: Traffic) -> None:
    """Recording rules as written and as Prometheus records them; each alert's operands without the
    threshold (an alert that is silent on a healthy stack has no series as written), and for an alert on
    absence the series whose absence it watches."""
    signals: dict[str, str] = {}
    for rule in rules():
        if "record" in rule:
            signals[f"record {rule['record']}"] = rule["expr"]
            signals[f"recorded {rule['record']}"] = f'{rule["record"]}{{model="{MODEL}"}}'
        else:
            for i, operand in enumerate(split_set_operands(rule["expr"])):
                signals[f"alert {rule['alert']} [{i}]"] = watched_signal(operand)
    # Recorded series appear at the first rule evaluation after the traffic was scraped.
    empty = await settled(lambda: without_data(observed, signals), {})
    assert not empty, f"rule expressions with no data: {json.dumps(empty, indent=2)}"


async def test_client_mistakes_raise_no_alert(observed: LocalStack, traffic: Traffic) -> None:
    """NOT_FOUND and INVALID_ARGUMENT are the callers' to fix: the error ratio stays 0 and nothing is
    pending, every tier up included. (Latency, queue-wait and cold-start alerts depend on this machine's
    load, so they are left out.)"""
    ratio = f'model:flotilla_router_error_ratio:rate5m{{model="{MODEL}"}}'
    assert await settled(lambda: by_labels(observed, ratio), {(): 0.0}) == {(): 0.0}
    load_dependent = {"FlotillaModelLatencyHigh", "FlotillaQueueWaitHigh", "FlotillaColdStartSlow"}
    alerts = "|".join(r["alert"] for r in rules() if "alert" in r and r["alert"] not in load_dependent)
    # COLD's requests waited for its cold start with no ready copy: FlotillaModelNoReadyCopy may be pending
    # until the rules see the copy the controller loaded.
    pending = await settled(lambda: [s["metric"] for s in query(observed, f'ALERTS{{alertname=~"{alerts}"}}')], [])
    assert not pending, pending

"""Batching shards on a real stack: many models over two batcher processes, one of them killed under load.

A dedicated stack with ``batcher.shards`` 2, one Triton replica and 50
registered models. The models are tiny and cheap to hold: every one is the
near-free graph (``flotilla.modelbuild.nearfree``) from one artifact, and
all name one Triton model (``backend_model``), so the replica holds one copy
whatever the number of models. Each is called through the router with real
JPEGs; both shards must host some. Then one shard is SIGKILLed while every
model takes calls: its models must answer again through the other shard
within seconds (the controller drops a shard silent for
``heartbeat_timeout_s`` and moves its models), and every call must succeed
without its caller retrying: the router holds a call whose model's only shard
is dead until the model moves (before, 8 of 551 calls got UNAVAILABLE first and
their callers retried 93 times). Finally every model is undeployed and its
route goes (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc
from flotilla.bench.overhead import ensure_model
from flotilla.clients.client import FlotillaClient
from flotilla.clients.models import ModelsClient, upload_artifact
from flotilla.common.probe import is_serving
from flotilla.config import ModelSettings
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from flotilla.stack.processes import ManagedProcess
from tests.integration.conftest import API_KEY, MODEL, REPO, sample, stack_settings
from tests.waiting import until

MODELS = [f"shard-m{i:02d}" for i in range(50)]
SOLO = "shard-solo"
"""A model whose spec asks for a batcher of its own."""
BACKEND = "near-free-shared"
STORAGE_URI = "s3://flotilla-models/near-free-shared"
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 2.0
MOVE_GRACE_S = 2.0
LOAD_WORKERS = 16
RETRY_FOR_S = 10.0
"""How long a call that got UNAVAILABLE is retried (every RETRY_EVERY_S) before it counts as lost."""
RETRY_EVERY_S = 0.2
HOT_MODEL_RPS = 20.0
"""Low enough that one model under this test's load is hot; the spread-over-every-model loads stay below it."""
BACK_WITHIN_S = 15.0
"""Seconds from the kill until every model of the killed shard answers through the other one."""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("shards"),
        batcher={"shards": 2},
        triton={"replicas": 1},
        controller={
            "measure_memory": False,
            "autoscale": {"scale_to_zero_idle_s": 3600.0},  # no copy goes while the test runs
            "shards": {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                       "move_grace_s": MOVE_GRACE_S, "hot_model_rps": HOT_MODEL_RPS, "rebalance_interval_s": 1.0},
        },
    )
    base = settings.models[MODEL]
    settings.models = {}  # the models come from the test, through the registry
    with LocalStack(settings) as stack:
        assert stack.settings is not None
        upload_artifact(stack.settings.s3, ensure_model(REPO / "build" / "models" / "near-free"), STORAGE_URI)
        spec = base.model_copy(update={
            "artifact": None, "storage_uri": STORAGE_URI, "backend_model": BACKEND, "labels": [],
            "labels_file": None, "memory_mb": 1.0, "min_copies": 0, "max_copies": 1,
        })
        for name in MODELS:
            stack.deploy(name, spec, wait=False)
        yield stack


@pytest.fixture(scope="module")
def models(sharded: LocalStack) -> Iterator[ModelsClient]:
    with sharded.models_client() as client:
        yield client


@pytest.fixture
async def client(sharded: LocalStack) -> AsyncIterator[FlotillaClient]:
    assert sharded.state is not None and sharded.settings is not None
    # Retries off: the test sees every UNAVAILABLE and retries it itself, counting.
    async with FlotillaClient(sharded.state.router, API_KEY, sharded.settings.s3, transparent_retries=False,
                              default_timeout_s=30.0) as c:
        yield c


def hosts(models: ModelsClient) -> dict[str, list[str]]:
    """Model -> the shards the controller lists for it."""
    return {m.name: list(m.batchers) for m in models.list() if m.name in MODELS}


async def hosted_by(shard: ManagedProcess) -> list[str]:
    """The models a shard says it hosts (leaving ones included)."""
    async with grpc.aio.insecure_channel(shard.address) as channel:
        listed = await batcher_pb2_grpc.BatcherAdminStub(channel).ListStats(batcher_pb2.ListStatsRequest(), timeout=5)
    return [m.model_name for m in listed.models]


async def answers(client: FlotillaClient, image: str, model: str, timeout_s: float = 10.0) -> bool:
    try:
        await client.classify(image, model, timeout_s=timeout_s)
    except FlotillaError:
        return False
    return True


async def test_fifty_models_spread_over_both_shards_and_each_answers(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    assert len(sharded.shards) == 2
    await until(lambda: sorted(n for n, b in hosts(models).items() if b) == MODELS, 60,
                "every model assigned to a shard")
    shard_addresses = {p.address for p in sharded.shards}
    assert all(set(b) <= shard_addresses for b in hosts(models).values())
    images = [await client.upload(sample(name)) for name in ("chelsea.jpg", "coffee.jpg")]
    for i, name in enumerate(MODELS):  # one at a time: the first call of each is its cold start
        reply = await client.classify(images[i % 2], name, timeout_s=60)
        assert reply.model == name and reply.classes
    on_shard = [await hosted_by(p) for p in sharded.shards]
    assert all(on_shard), f"both shards host models: {[len(m) for m in on_shard]}"
    assert sorted(m for hosted in on_shard for m in hosted) == MODELS, "each model on one shard"
    assert sharded.batchers[MODELS[0]].address in shard_addresses


async def test_a_hot_model_gets_a_second_shard_and_gives_it_back_when_the_load_stops(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    """Above ``hot_model_rps`` a model's queue is also put on the other shard (routers spread its calls
    over both, each shard batching its share); with the load gone, it is back on one. Every call answers."""
    hot = MODELS[1]
    image = await client.upload(sample("chelsea.jpg"))
    await client.classify(image, hot, timeout_s=60)
    assert len(hosts(models)[hot]) == 1
    calls: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                await client.classify(image, hot, timeout_s=10.0)
                calls["OK"] += 1
            except FlotillaError as exc:
                calls[exc.code.name] += 1
                await asyncio.sleep(RETRY_EVERY_S)  # duration: a caller's backoff after UNAVAILABLE

    workers = [asyncio.create_task(load()) for _ in range(8)]
    try:
        await until(lambda: len(hosts(models)[hot]) == 2, 30, f"{hot} queued on both shards under load")
        ok_before = calls["OK"]
        await until(lambda: calls["OK"] >= ok_before + 100, 30, "calls answered on both shards")
        on_both = [hot in await hosted_by(shard) for shard in sharded.shards]
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert all(on_both), on_both
    assert set(calls) <= {"OK", "UNAVAILABLE"} and calls["UNAVAILABLE"] <= calls["OK"] / 100, calls
    await until(lambda: len(hosts(models)[hot]) == 1, 30, f"{hot} back on one shard once idle")


async def test_calls_held_by_a_hung_shard_follow_their_models_to_the_other_one(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    """A shard stopped (SIGSTOP: it holds the calls it has and answers nothing) with calls on it: the
    controller moves its models after ``heartbeat_timeout_s``, and once the router lets go of the
    shard (``LINGER_S``) the calls it held go again on the models' shard now. Every one succeeds; none
    needs its caller to retry (before, each failed UNAVAILABLE: its retry stayed on the pool it began on)."""
    await until(lambda: all(hosts(models).values()), 60, "every model assigned")
    image = await client.upload(sample("chelsea.jpg"))
    other, hung = sharded.shards
    held = [name for name, on in hosts(models).items() if on == [hung.address]]
    assert held, "the shard to stop hosts models of its own"
    for name in held:  # loaded: the calls below wait for the shard, not for a cold start
        await client.classify(image, name, timeout_s=60)
    codes: Counter[str] = Counter()

    async def call(name: str) -> None:
        try:
            await client.classify(image, name, timeout_s=30.0)
            codes["OK"] += 1
        except FlotillaError as exc:
            codes[f"{exc.code.name}: {exc.message}"] += 1

    assert hung.pid is not None
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        await asyncio.gather(*(call(name) for name in held))
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    assert codes == Counter({"OK": len(held)}), codes
    assert all(hosts(models)[name] == [other.address] for name in held), "the held calls' models moved"
    await until(lambda: is_serving(hung.address), 30, "the stopped shard serving again")


@dataclass
class Tally:
    """What the calls under load got."""

    sent: int = 0
    succeeded: int = 0
    unavailable: int = 0
    """Calls that got UNAVAILABLE at least once (each then retried until it succeeded)."""
    retries: int = 0
    lost: list[str] = field(default_factory=list)
    """Calls with no success: their last error."""
    codes: Counter[str] = field(default_factory=Counter)


async def call_until_answered(client: FlotillaClient, image: str, model: str, tally: Tally) -> None:
    """One call, retried on UNAVAILABLE for up to RETRY_FOR_S; anything else, or no success by then, is lost."""
    tally.sent += 1
    first_failure_s: float | None = None
    while True:
        try:
            await client.classify(image, model, timeout_s=10.0)
        except FlotillaError as exc:
            tally.codes[exc.code.name] += 1
            now = time.monotonic()
            if exc.code != Code.UNAVAILABLE:
                tally.lost.append(f"{model}: {exc.code.name} {exc.message}")
                return
            if first_failure_s is None:
                first_failure_s, tally.unavailable = now, tally.unavailable + 1
            if now - first_failure_s > RETRY_FOR_S:
                tally.lost.append(f"{model}: still UNAVAILABLE after {RETRY_FOR_S:.0f} s: {exc.message}")
                return
            tally.retries += 1
            await asyncio.sleep(RETRY_EVERY_S)  # duration: the retry backoff of a well-behaved caller
            continue
        tally.succeeded += 1
        return


async def test_a_killed_shard_s_models_answer_again_through_the_other_and_no_call_is_lost(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    await until(lambda: all(hosts(models).values()), 60, "every model assigned")
    images = [await client.upload(sample(name)) for name in ("chelsea.jpg", "coffee.jpg")]
    for i, name in enumerate(MODELS):  # loaded (cold starts are the previous test's, unless it ran alone)
        await client.classify(images[i % 2], name, timeout_s=60)
    victim, survivor = sharded.shards
    moved = [name for name, on in hosts(models).items() if victim.address in on]
    assert moved, "the victim hosts models"
    tally = Tally()
    stop = asyncio.Event()

    async def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            await call_until_answered(client, images[i % 2], MODELS[i % len(MODELS)], tally)
            i += LOAD_WORKERS

    workers = [asyncio.create_task(load(w)) for w in range(LOAD_WORKERS)]
    try:
        await until(lambda: tally.succeeded >= 100, 30, "the load running")
        sharded.supervisor.remove(victim.name)  # it stays dead: its models must move
        victim.kill()
        killed_s = time.monotonic()

        def all_moved() -> bool:
            on = hosts(models)
            return all(on[name] == [survivor.address] for name in moved)

        await until(all_moved, BACK_WITHIN_S, "the killed shard's models listed on the other shard")

        async def all_answer() -> bool:
            results = await asyncio.gather(*(answers(client, images[0], name) for name in moved))
            return all(results)

        await until(all_answer, BACK_WITHIN_S, "every moved model answering through the other shard", interval_s=0.2)
        back_s = time.monotonic() - killed_s
        sent_after = tally.sent
        await until(lambda: tally.sent >= sent_after + 100, 30, "the load going on after the move")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    print(f"shard killed: {len(moved)} models moved, all answering again {back_s:.1f} s later; {tally.sent} calls, "
          f"{tally.succeeded} succeeded, {tally.unavailable} got UNAVAILABLE first ({tally.retries} retries); "
          f"errors by code {dict(tally.codes)}")
    assert not tally.lost, f"calls with no success ({len(tally.lost)} of {tally.sent}): {tally.lost[:3]}"
    assert tally.succeeded == tally.sent, tally
    # The router held the calls of the killed shard's models until they moved: none failed to retry.
    assert tally.unavailable == 0 and not tally.codes, tally.codes
    assert sorted(await hosted_by(survivor)) == MODELS


async def test_a_model_that_asks_for_isolation_gets_a_batcher_of_its_own(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    """``dedicated_batcher``: the stack starts ``batcher-<model>`` for it, the controller moves the model's
    queue there from the shared shard it waited on, no other model's queue goes there, and the process
    goes with the model."""
    spec = ModelSettings.model_validate_json(models.status(MODELS[0]).spec_json)
    models.deploy(SOLO, spec.model_copy(update={"dedicated_batcher": True}))

    def own() -> ManagedProcess | None:
        proc = sharded.dedicated.get(SOLO)
        return proc if proc is not None and list(models.status(SOLO).batchers) == [proc.address] else None

    await until(lambda: own() is not None, 60, f"{SOLO}'s queue on a batcher of its own")
    proc = own()
    assert proc is not None and proc.name == f"batcher-{SOLO}"
    image = await client.upload(sample("chelsea.jpg"))
    reply = await client.classify(image, SOLO, timeout_s=60)
    assert reply.model == SOLO and reply.classes
    assert await hosted_by(proc) == [SOLO], "a dedicated batcher holds no other model's queue"

    async def off_the_shared_shards() -> bool:  # the lane it waited on leaves after move_grace_s
        live = [shard for shard in sharded.shards if shard.alive()]  # the kill test's victim stays dead
        return all(SOLO not in hosted for hosted in [await hosted_by(shard) for shard in live])

    await until(off_the_shared_shards, MOVE_GRACE_S + 10, f"{SOLO}'s lane gone from the shared shards")

    models.undeploy(SOLO)
    await until(lambda: SOLO not in sharded.dedicated, 30, f"{SOLO}'s batcher stops with it")
    assert not proc.alive()


async def test_undeploying_every_model_removes_its_routes(
    sharded: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    image = await client.upload(sample("chelsea.jpg"))
    for name in MODELS:
        models.undeploy(name)
    assert not hosts(models)

    async def routes_gone() -> bool:
        for name in MODELS:
            try:
                await client.classify(image, name, timeout_s=5)
            except FlotillaError as exc:
                if exc.code == Code.NOT_FOUND:
                    continue
            return False
        return True

    await until(routes_gone, 30, "every route gone (NOT_FOUND)", interval_s=0.2)
    live = [p for p in sharded.shards if p.alive() and is_serving(p.address)]
    assert live

    async def lanes_gone() -> bool:
        return not any([await hosted_by(p) for p in live])

    await until(lanes_gone, MOVE_GRACE_S + 10, "the shards' queues gone after the grace", interval_s=0.2)

"""Faults on real processes under steady load (pytest -m faults).

A dedicated stack (2 Triton replicas, 2 preprocess workers) takes a steady
closed-loop load of good and bad requests while parts are killed (or, for
a Triton replica, stopped); the
stack's supervisor starts them again (a restarted Triton comes back empty
and the controller loads the model again). Every request must end with exactly one terminal answer; good
requests must not fail while a Triton replica or a worker dies; with the
object store down they fail with UNAVAILABLE before their deadline. The
figures are printed and written to build/fault-figures.json.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from flotilla.api.v1 import batcher_pb2_grpc, pools_pb2, preprocess_pb2_grpc
from flotilla.clients.client import FlotillaClient
from flotilla.clients.results import StreamResult
from flotilla.common.probe import is_serving
from flotilla.errors import Code, FlotillaError
from flotilla.services.preprocess.triton.shm import SHM_DIR
from flotilla.stack.local import LocalStack, triton_ready
from tests.integration.conftest import API_KEY, MODEL, REPO, sample, stack_settings
from tests.waiting import until

pytestmark = pytest.mark.faults

REQUEST_TIMEOUT_S = 10.0
FIGURES = REPO / "build" / "fault-figures.json"


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(tmp_path_factory.mktemp("fault-stack"), preprocess={"workers": 2})
    settings.models[MODEL].min_copies = settings.models[MODEL].max_copies = 2  # a copy on each replica
    settings.models[MODEL].batching.max_queue_delay_us = 5_000
    settings.models[MODEL].batching.max_inflight_batches = 4
    settings.models[MODEL].backend.instance_groups = 2  # capacity 2 x 2 x 1 = 4 batches
    with LocalStack(settings) as stack:
        yield stack


@dataclass
class Outcome:
    kind: str
    """'good', 'missing', 'not_jpeg' or 'bad_uuid'."""
    code: Code
    message: str = ""
    elapsed_s: float = 0.0
    ended_s: float = 0.0
    """time.monotonic() when the answer came."""


@dataclass
class SteadyLoad:
    """Closed-loop load of mixed requests; one Outcome per request sent."""

    client: FlotillaClient
    requests: list[tuple[str, str]]
    concurrency: int = 6
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0
    stalls: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) windows of time.monotonic() in which any request may end DEADLINE_EXCEEDED: a stopped
    replica held its batch, and an answer (even a bad item's) can only come at the deadline."""
    in_flight: dict[int, float] = field(default_factory=dict)
    """Request number -> time.monotonic() when it was sent, for the requests not answered yet."""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        cycle = itertools.cycle(self.requests)

        async def worker() -> None:
            while not self._stop.is_set():
                kind, uuid = next(cycle)
                self.sent += 1
                number, start = self.sent, time.monotonic()
                self.in_flight[number] = start
                try:
                    result = await self.client.classify(uuid, MODEL, timeout_s=REQUEST_TIMEOUT_S, request_id=f"r{self.sent}")
                    assert result.image_uuid == uuid, "answer for another request"
                    now = time.monotonic()
                    self.outcomes.append(Outcome(kind, Code.OK, elapsed_s=now - start, ended_s=now))
                except FlotillaError as exc:
                    now = time.monotonic()
                    self.outcomes.append(Outcome(kind, exc.code, exc.message, now - start, now))
                finally:
                    del self.in_flight[number]

        self._tasks = [asyncio.create_task(worker()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def since(self, mark: int) -> list[Outcome]:
        return self.outcomes[mark:]

    def all_sent_after(self, moment_s: float) -> bool:
        """Whether every request still open was sent after ``moment_s`` (the ones before it are answered)."""
        return all(sent_s > moment_s for sent_s in list(self.in_flight.values()))


@pytest.fixture
async def load(fault_stack: LocalStack) -> AsyncIterator[SteadyLoad]:
    assert fault_stack.state is not None and fault_stack.settings is not None
    async with FlotillaClient(
        fault_stack.state.router, API_KEY, fault_stack.settings.s3, transparent_retries=False
    ) as client:
        good = [await client.upload(sample(p)) for p in ("coffee.jpg", "chelsea.jpg", "rocket.jpg") for _ in range(3)]
        not_jpeg = await client.upload(b"GIF89a definitely not a jpeg")
        requests = [("good", u) for u in good] + [
            ("missing", "0b7e8c9a-1234-4cde-8f00-00000000dead"),
            ("not_jpeg", not_jpeg),
            ("bad_uuid", "../etc/passwd"),
        ]
        runner = SteadyLoad(client, requests)
        runner.start()
        try:
            yield runner
        finally:
            await runner.stop()
    check_terminal_answers(runner)


EXPECTED_BAD = {"missing": Code.NOT_FOUND, "not_jpeg": Code.INVALID_ARGUMENT, "bad_uuid": Code.INVALID_ARGUMENT}


def check_terminal_answers(load: SteadyLoad) -> None:
    """Nothing accepted is lost: one terminal answer per request, each the right one."""
    assert len(load.outcomes) == load.sent, f"{load.sent} sent, {len(load.outcomes)} answered"
    for outcome in load.outcomes:
        stalled = any(start <= outcome.ended_s <= end for start, end in load.stalls)
        if stalled and outcome.code == Code.DEADLINE_EXCEEDED:
            continue
        if outcome.kind in EXPECTED_BAD:
            assert outcome.code in (EXPECTED_BAD[outcome.kind], Code.UNAVAILABLE), outcome
        assert outcome.elapsed_s < REQUEST_TIMEOUT_S + 1.0, f"answer after its deadline: {outcome}"


async def pools_of(address: str, stub_factory: Callable) -> pools_pb2.Pools:  # type: ignore[type-arg]
    async with grpc.aio.insecure_channel(address) as channel:
        return await stub_factory(channel).GetPools(pools_pb2.GetPoolsRequest(), timeout=2)


async def admitted_everywhere(stack: LocalStack, address: str, stub_factory: Callable, holders: list[str]) -> list[bool]:  # type: ignore[type-arg]
    """Per holder: is ``address`` in its pool and admitted (a replica that left the pool is not)."""
    verdicts = []
    for holder in holders:
        try:
            pools = (await pools_of(holder, stub_factory)).pools
        except grpc.aio.AioRpcError:
            verdicts.append(False)  # the holder itself is restarting
            continue
        verdicts.append(any(e.admitted for pool in pools for e in pool.endpoints if e.address == address))
    return verdicts


def record(name: str, figures: dict[str, object]) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    existing[name] = figures
    FIGURES.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"\n{name}: {figures}")


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    good = [o for o in outcomes if o.kind == "good"]
    return {
        "sent": len(outcomes),
        "good_succeeded": sum(o.code == Code.OK for o in good),
        "good_failed": sum(o.code != Code.OK for o in good),
        "bad_answered_with_their_status": sum(o.code == EXPECTED_BAD.get(o.kind) for o in outcomes if o.kind in EXPECTED_BAD),
    }


async def test_sigkill_a_triton_replica(fault_stack: LocalStack, load: SteadyLoad) -> None:
    workers = [p.address for p in fault_stack.preprocess]
    victim = fault_stack.tritons[0]
    await until(lambda: _recent_good_ok(load), 30, "the load served before the fault")
    mark = len(load.outcomes)

    victim.kill()  # the supervisor starts it again, empty; the controller loads the model again
    ejected_s = await until(lambda: _all_false(admitted_everywhere(fault_stack, victim.address, preprocess_pb2_grpc.PreprocessorStub, workers)), 5, "the killed replica ejected")
    readmitted_s = await until(lambda: _all_true(admitted_everywhere(fault_stack, victim.address, preprocess_pb2_grpc.PreprocessorStub, workers)), 120, "the restarted replica admitted")
    traffic_s = await until(_traffic_to(victim.address, workers), 10, "the restarted replica gets traffic again")

    figures = {**tally(load.since(mark)), "ejected_after_s": round(ejected_s, 3),
               "readmitted_after_restart_s": round(readmitted_s, 3), "traffic_again_after_s": round(traffic_s, 3)}
    record("sigkill_triton", figures)
    assert figures["good_failed"] == 0, [o for o in load.since(mark) if o.kind == "good" and o.code != Code.OK][:3]
    assert ejected_s < 1.5
    assert fault_stack.supervisor.restarts(victim.name) >= 1


async def test_a_hung_triton_replica_leaves_the_pools_until_it_answers_again(
    fault_stack: LocalStack, load: SteadyLoad
) -> None:
    """A replica whose process stops answering while its host and sockets stay up (SIGSTOP: no connection
    breaks, its kernel still acknowledges) leaves the fleet on the controller's liveness check, so the
    other copy takes the batches; it comes back once it answers again."""
    workers = [p.address for p in fault_stack.preprocess]
    victim = fault_stack.tritons[0]
    assert victim.pid is not None
    restarts = fault_stack.supervisor.restarts(victim.name)
    await until(lambda: _recent_good_ok(load), 30, "the load served before the fault")

    stopped_s = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        left_s = await until(lambda: _all_false(admitted_everywhere(fault_stack, victim.address, preprocess_pb2_grpc.PreprocessorStub, workers)), 10, "the stopped replica left the pools")
        # Batches the replica took before it left can only end at their deadlines: wait those out, then
        # every request must succeed on the other copy.
        left_at_s = time.monotonic()
        await until(lambda: load.all_sent_after(left_at_s), REQUEST_TIMEOUT_S + 10, "the requests it held ended")
        mark = len(load.outcomes)
        await asyncio.sleep(2.0)  # duration: a 2 s window of load with the replica stopped, counted
        after = load.since(mark)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    # Batches it held end at their deadlines: at most one request timeout after it stopped.
    load.stalls.append((stopped_s, stopped_s + REQUEST_TIMEOUT_S + 1.0))
    stalled = [o for o in load.outcomes if o.code == Code.DEADLINE_EXCEEDED]
    back_s = await until(lambda: _all_true(admitted_everywhere(fault_stack, victim.address, preprocess_pb2_grpc.PreprocessorStub, workers)), 30, "the resumed replica admitted")
    traffic_s = await until(_traffic_to(victim.address, workers), 10, "the resumed replica gets traffic again")

    figures = {"while_stopped": tally(after), "left_the_pools_after_s": round(left_s, 3),
               "held_to_their_deadline": len(stalled),
               "back_after_resume_s": round(back_s, 3), "traffic_again_after_s": round(traffic_s, 3)}
    record("sigstop_triton", figures)
    assert left_s < 5
    assert tally(after)["good_succeeded"] > 0 and tally(after)["good_failed"] == 0, figures
    assert fault_stack.supervisor.restarts(victim.name) == restarts, "a stopped process is not a dead one"


async def test_sigkill_a_preprocess_worker(fault_stack: LocalStack, load: SteadyLoad) -> None:
    assert fault_stack.state is not None
    batcher = fault_stack.batchers[MODEL].address
    victim = fault_stack.preprocess[0]
    await until(lambda: _recent_good_ok(load), 30, "the load served before the fault")
    mark = len(load.outcomes)
    killed_regions = list(SHM_DIR.glob(f"flotilla-worker-{victim.pid}-*"))  # its batches' shared memory

    victim.kill()  # the supervisor starts it again
    ejected_s = await until(lambda: _all_false(admitted_everywhere(fault_stack, victim.address, batcher_pb2_grpc.BatcherAdminStub, [batcher])), 5, "the killed worker ejected")
    readmitted_s = await until(lambda: _all_true(admitted_everywhere(fault_stack, victim.address, batcher_pb2_grpc.BatcherAdminStub, [batcher])), 60, "the restarted worker admitted")
    await asyncio.sleep(1.0)  # duration: the window goes on a second past the readmission

    figures = {**tally(load.since(mark)), "ejected_after_s": round(ejected_s, 3), "readmitted_after_restart_s": round(readmitted_s, 3)}
    record("sigkill_preprocess_worker", figures)
    assert figures["good_failed"] == 0, [o for o in load.since(mark) if o.kind == "good" and o.code != Code.OK][:3]
    assert killed_regions, "the worker sent its batches to the local replicas through shared memory"
    assert not [p for p in killed_regions if p.exists()], "the restarted worker removed the killed one's regions"


async def test_object_store_outage_fails_fast_then_recovers(fault_stack: LocalStack, load: SteadyLoad) -> None:
    assert fault_stack.s3 is not None
    await until(lambda: _recent_good_ok(load), 30, "the load served before the fault")
    fault_stack.supervisor.remove(fault_stack.s3.name)  # an outage the supervisor leaves alone
    fault_stack.s3.stop()
    stopped_s = time.monotonic()
    await until(lambda: load.all_sent_after(stopped_s), REQUEST_TIMEOUT_S + 5, "the requests sent before it ended")
    mark = len(load.outcomes)
    await asyncio.sleep(2.0)  # duration: a 2 s window of load with the object store down, counted
    during = load.since(mark)

    fault_stack.s3.start()
    fault_stack.supervisor.add(fault_stack.s3)
    recovered_s = await until(lambda: _recent_good_ok(load), 60, "good requests served again")
    mark_after = len(load.outcomes)
    await asyncio.sleep(1.5)  # duration: a 1.5 s window of load after the recovery, counted
    after = load.since(mark_after)

    good_during = [o for o in during if o.kind == "good"]
    figures = {"during_outage": tally(during), "during_outage_codes": dict(Counter(o.code.name for o in good_during)),
               "max_answer_s_during_outage": round(max((o.elapsed_s for o in during), default=0.0), 3),
               "recovered_after_restart_s": round(recovered_s, 3), "after_recovery": tally(after)}
    record("object_store_outage", figures)
    assert good_during and all(o.code == Code.UNAVAILABLE for o in good_during), figures
    assert all("object store" in o.message for o in good_during)
    assert max(o.elapsed_s for o in during) < REQUEST_TIMEOUT_S  # nobody hangs to the deadline
    assert tally(after)["good_failed"] == 0 and tally(after)["good_succeeded"] > 0


async def test_instance_groups_reach_triton_and_the_pool(fault_stack: LocalStack) -> None:
    import tritonclient.grpc as triton_grpc

    for proc in fault_stack.tritons:
        client = triton_grpc.InferenceServerClient(proc.address)
        try:
            config = client.get_model_config(MODEL, as_json=True)["config"]
        finally:
            client.close()
        assert [int(g["count"]) for g in config["instance_group"]] == [2]
    for worker in fault_stack.preprocess:
        pools = (await pools_of(worker.address, preprocess_pb2_grpc.PreprocessorStub)).pools
        assert [p.max_outstanding for p in pools] == [2]  # instance_groups x predict_concurrency


STREAMED_IMAGES = 400


async def test_sigkill_the_router_under_classify_many_every_image_is_classified(fault_stack: LocalStack) -> None:
    """The router killed under a stream of images (the supervisor starts it again): every request
    on the stream fails UNAVAILABLE with it, and ``classify_many`` opens a new stream and sends
    them again, so every image is classified, none lost and none failed."""
    assert fault_stack.state is not None and fault_stack.settings is not None and fault_stack.router is not None
    router = fault_stack.router
    async with FlotillaClient(fault_stack.state.router, API_KEY, fault_stack.settings.s3) as client:
        good = [await client.upload(sample(p)) for p in ("coffee.jpg", "chelsea.jpg", "rocket.jpg")]
        items = [good[i % len(good)] for i in range(STREAMED_IMAGES)]
        results: list[StreamResult] = []
        killed_pid, killed_s = None, 0.0
        async for result in client.classify_many(items, MODEL, window=16, timeout_s=REQUEST_TIMEOUT_S * 3):
            results.append(result)
            if len(results) == STREAMED_IMAGES // 4:
                killed_pid, killed_s = router.pid, time.monotonic()
                router.kill()  # the supervisor starts it again
        done_s = time.monotonic()

    failed = [r for r in results if not r.ok]
    record("sigkill_router_under_classify_many", {
        "images": len(results), "failed": len(failed), "rest_done_after_kill_s": round(done_s - killed_s, 3),
    })
    assert sorted(r.index for r in results) == list(range(STREAMED_IMAGES)), "one result per image"
    assert not failed, failed[:3]
    assert all(r.unwrap().image_uuid == items[r.index] for r in results), "each result is its own image's"
    assert killed_pid is not None and router.pid not in (None, killed_pid), "the router was killed and started again"


def test_every_service_is_healthy_after_the_faults(fault_stack: LocalStack) -> None:
    for proc in fault_stack.flotilla_services():
        assert proc.alive() and is_serving(proc.address), proc.name
    for proc in fault_stack.tritons:
        assert proc.alive() and triton_ready(proc.address), proc.name


async def _all_false(verdicts_coro) -> bool:  # type: ignore[no-untyped-def]
    verdicts = await verdicts_coro
    return bool(verdicts) and not any(verdicts)


async def _all_true(verdicts_coro) -> bool:  # type: ignore[no-untyped-def]
    verdicts = await verdicts_coro
    return bool(verdicts) and all(verdicts)


async def _calls(address: str, workers: list[str]) -> int:
    total = 0
    for worker in workers:
        for pool in (await pools_of(worker, preprocess_pb2_grpc.PreprocessorStub)).pools:
            total += sum(e.calls for e in pool.endpoints if e.address == address)
    return total


def _traffic_to(address: str, workers: list[str]) -> Callable[[], Awaitable[bool]]:
    """A condition: the workers sent ``address`` a call since this was made."""
    before: list[int] = []

    async def more_calls() -> bool:
        calls = await _calls(address, workers)
        before[:] = before or [calls]
        return calls > before[0]

    return more_calls


async def _recent_good_ok(load: SteadyLoad) -> bool:
    recent = [o for o in load.outcomes[-10:] if o.kind == "good"]
    return bool(recent) and all(o.code == Code.OK for o in recent)


async def test_a_dead_tier_under_load_leaves_a_short_log(fault_stack: LocalStack, load: SteadyLoad) -> None:
    """The router logs the batcher's state changes and failure counts, not a line per failed call."""
    assert fault_stack.router is not None
    victim = fault_stack.batchers[MODEL]
    fault_stack.supervisor.remove(victim.name)  # stays down for the whole window
    router_log = fault_stack.router.log_path
    lines_before = len(router_log.read_text().splitlines())
    mark = len(load.outcomes)

    victim.kill()
    killed_s = time.monotonic()
    await asyncio.sleep(5.0)  # duration: the batcher stays dead 5 s under load
    # Calls made while it was dead (one answered just before the kill, INVALID_ARGUMENT say, is not one).
    failed = [o for o in load.since(mark) if o.code != Code.OK and o.ended_s - o.elapsed_s >= killed_s]
    victim.start()
    fault_stack.supervisor.add(victim)
    await until(lambda: _recent_good_ok(load), 60, "good requests served again")

    added = router_log.read_text().splitlines()[lines_before:]
    record("dead_batcher_log", {"failed_calls": len(failed), "router_log_lines": len(added)})
    assert len(failed) > 100, "the load kept calling the dead tier"
    assert all(o.code == Code.UNAVAILABLE for o in failed), Counter(
        (o.code.name, o.message[:120]) for o in failed if o.code != Code.UNAVAILABLE
    ).most_common(3)
    assert len(added) <= 25, "\n".join(added)

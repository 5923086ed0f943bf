"""EndpointPool and RoundRobin: spreading, retrying UNAVAILABLE, ejecting."""

from __future__ import annotations

import pytest

from flotilla.errors import (
    BackendError,
    Code,
    DeadlineExceeded,
    NoHealthyEndpoint,
    StoreUnavailable,
    Unavailable,
)
from flotilla.pool.pool import Endpoint, EndpointPool, RoundRobin


class ManualTime:
    """The pool's clock: a plain ``() -> float`` a test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Script:
    """The call made on an endpoint: records the address, fails where told to."""

    def __init__(self, failing: dict[str, BaseException] | None = None) -> None:
        self.failing = dict(failing or {})
        self.visited: list[str] = []

    async def __call__(self, endpoint: Endpoint[str]) -> str:
        self.visited.append(endpoint.address)
        assert endpoint.outstanding == 1, "the endpoint in use counts this call as outstanding"
        error = self.failing.get(endpoint.address)
        if error is not None:
            raise error
        return f"answer from {endpoint.client}"


ADDRESSES = ["a:1", "b:2", "c:3"]


def make_pool(clock: ManualTime | None = None, addresses: list[str] = ADDRESSES, **kwargs) -> EndpointPool[str]:
    clients = {address: f"client-{address}" for address in addresses}
    return EndpointPool("worker", clients, clock=clock or ManualTime(), **kwargs)


def test_round_robin_takes_candidates_in_turn_and_wraps() -> None:
    endpoints = [Endpoint(a, None) for a in ADDRESSES]
    rr = RoundRobin()
    chosen = [rr.choose(endpoints).address for _ in range(7)]
    assert chosen == ["a:1", "b:2", "c:3", "a:1", "b:2", "c:3", "a:1"]


async def test_a_pool_with_no_endpoints_fails_calls_as_unavailable() -> None:
    pool = EndpointPool("worker", {})
    with pytest.raises(NoHealthyEndpoint, match="there are none right now") as caught:
        await pool.call(Script())
    assert caught.value.code == Code.UNAVAILABLE


async def test_set_endpoints_keeps_the_state_of_endpoints_that_stay() -> None:
    clock = ManualTime()
    pool = make_pool(clock, eject_after_failures=1, eject_cooldown_s=10.0)
    await pool.call(Script({"a:1": Unavailable("down")}))  # a:1 ejected
    kept_b = pool.endpoints[1]

    removed = pool.set_endpoints({"a:1": "client-a:1", "b:2": "client-b:2", "d:4": "client-d:4"})

    assert removed == ["client-c:3"]
    assert [e.address for e in pool.endpoints] == ["a:1", "b:2", "d:4"]
    assert pool.endpoints[1] is kept_b
    assert [e.address for e in pool.admitted()] == ["b:2", "d:4"], "a:1 stays ejected; d:4 is new and admitted"
    script = Script()
    await pool.call(script)
    await pool.call(script)
    assert sorted(script.visited) == ["b:2", "d:4"]


async def test_calls_visit_every_endpoint_in_turn() -> None:
    pool = make_pool()
    script = Script()

    answers = [await pool.call(script) for _ in range(6)]

    assert script.visited == ADDRESSES * 2
    assert answers[0] == "answer from client-a:1"
    assert [e.calls for e in pool.endpoints] == [2, 2, 2]


async def test_unavailable_is_retried_on_a_different_endpoint() -> None:
    pool = make_pool()
    script = Script({"a:1": Unavailable("a is down")})

    answer = await pool.call(script)

    assert script.visited[0] == "a:1"
    assert len(script.visited) == 2
    assert script.visited[1] != "a:1"
    assert answer == f"answer from client-{script.visited[1]}"
    assert pool.endpoints[0].consecutive_failures == 1


async def test_unavailable_subclasses_are_retried_too() -> None:
    pool = make_pool()
    script = Script({"a:1": StoreUnavailable("store down")})

    await pool.call(script)

    assert len(script.visited) == 2


async def test_other_errors_are_not_retried() -> None:
    pool = make_pool()
    script = Script({"a:1": BackendError("model crashed")})

    with pytest.raises(BackendError, match="model crashed"):
        await pool.call(script)

    assert script.visited == ["a:1"]
    assert pool.endpoints[0].consecutive_failures == 0


async def test_when_every_endpoint_fails_the_error_names_them_all_and_the_last_cause() -> None:
    pool = make_pool(max_attempts=5)
    script = Script({a: Unavailable(f"{a} down") for a in ADDRESSES})

    with pytest.raises(NoHealthyEndpoint) as info:
        await pool.call(script)

    # Each endpoint is tried at most once per call, even with attempts to spare.
    assert sorted(script.visited) == sorted(ADDRESSES)
    assert all(a in info.value.message for a in ADDRESSES)
    assert info.value.message.endswith(f"last error: {script.visited[-1]} down")


async def test_attempts_are_bounded_by_max_attempts() -> None:
    pool = make_pool(max_attempts=2)
    script = Script({a: Unavailable(f"{a} down") for a in ADDRESSES})

    with pytest.raises(Unavailable):
        await pool.call(script)

    assert len(script.visited) == 2


async def test_endpoint_is_ejected_after_consecutive_failures_until_cooldown_passes() -> None:
    clock = ManualTime()
    pool = make_pool(clock, addresses=["a:1", "b:2"], eject_after_failures=2, eject_cooldown_s=10.0)
    script = Script({"a:1": Unavailable("a down")})

    for _ in range(4):  # a fails on every visit; b answers each retry
        await pool.call(script)
    assert script.visited.count("a:1") == 2
    assert [e.address for e in pool.available()] == ["b:2"]

    script.visited.clear()
    for _ in range(3):
        await pool.call(script)
    assert script.visited == ["b:2"] * 3, "an ejected endpoint was chosen"

    clock.now_s += 9.9
    assert [e.address for e in pool.available()] == ["b:2"]
    clock.now_s += 0.2
    assert [e.address for e in pool.available()] == ["a:1", "b:2"]


async def test_a_success_resets_the_failure_count() -> None:
    pool = make_pool(addresses=["a:1"], eject_after_failures=2)
    failing = Script({"a:1": Unavailable("blip")})
    healthy = Script()

    with pytest.raises(Unavailable):
        await pool.call(failing)
    await pool.call(healthy)
    with pytest.raises(Unavailable):
        await pool.call(failing)

    assert pool.endpoints[0].consecutive_failures == 1
    assert pool.available() == pool.endpoints


async def test_all_ejected_are_still_tried_once_and_failing_names_them() -> None:
    pool = make_pool(addresses=["a:1", "b:2"], eject_after_failures=1, eject_cooldown_s=5.0)
    with pytest.raises(Unavailable):
        await pool.call(Script({"a:1": Unavailable("down"), "b:2": Unavailable("down")}))
    assert pool.available() == []

    still_down = Script({"a:1": Unavailable("refused"), "b:2": Unavailable("refused")})
    with pytest.raises(NoHealthyEndpoint) as info:
        await pool.call(still_down)

    assert sorted(still_down.visited) == ["a:1", "b:2"]  # each tried once, none twice
    assert info.value.code == Code.UNAVAILABLE
    assert "a:1" in info.value.message and "b:2" in info.value.message
    assert "worker" in info.value.message and "refused" in info.value.message


async def test_all_ejected_but_one_recovered_serves_the_call() -> None:
    pool = make_pool(addresses=["a:1", "b:2"], eject_after_failures=1, eject_cooldown_s=5.0)
    with pytest.raises(Unavailable):
        await pool.call(Script({"a:1": Unavailable("down"), "b:2": Unavailable("down")}))

    recovered = Script({"a:1": Unavailable("still down")})
    await pool.call(recovered)
    assert recovered.visited[-1] == "b:2"


async def test_deadline_in_the_past_raises_without_calling() -> None:
    clock = ManualTime()
    pool = make_pool(clock)
    script = Script()

    with pytest.raises(DeadlineExceeded):
        await pool.call(script, deadline_s=clock.now_s - 0.001)

    assert script.visited == []
    assert all(e.calls == 0 for e in pool.endpoints)


async def test_deadline_in_the_future_lets_the_call_run() -> None:
    clock = ManualTime()
    pool = make_pool(clock)
    script = Script()

    assert await pool.call(script, deadline_s=clock.now_s + 1.0) == "answer from client-a:1"


async def test_no_retry_starts_after_the_deadline() -> None:
    clock = ManualTime()
    pool = make_pool(clock)

    async def slow_failure(endpoint: Endpoint[str]) -> str:
        clock.now_s += 2.0  # the attempt used up the time left
        raise Unavailable("down")

    with pytest.raises(DeadlineExceeded):
        await pool.call(slow_failure, deadline_s=clock.now_s + 1.0)
    assert sum(e.calls for e in pool.endpoints) == 1


async def test_outstanding_returns_to_zero_after_success_and_failures() -> None:
    pool = make_pool()
    await pool.call(Script())
    with pytest.raises(Unavailable):
        await pool.call(Script({a: Unavailable("down") for a in ADDRESSES}))
    with pytest.raises(BackendError):
        await pool.call(Script({a: BackendError("bad") for a in ADDRESSES}))

    assert [e.outstanding for e in pool.endpoints] == [0, 0, 0]


async def test_a_failure_relayed_from_below_neither_ejects_nor_is_retried() -> None:
    # The batcher answers UNAVAILABLE because its worker, S3 or Triton is down: the batcher itself is
    # fine. Counting that against it ejected every healthy batcher of the model.
    below = Unavailable("object store at s3:1 is unreachable", origin="object store s3:1")
    pool = make_pool(addresses=["a:1", "b:2"], eject_after_failures=2)
    script = Script({"a:1": below, "b:2": below})
    for _ in range(6):
        with pytest.raises(Unavailable) as caught:
            await pool.call(script)
        assert caught.value is below, "passed on as it came, origin and message"
    assert len(script.visited) == 6, "one attempt per call: the tier below already tried its replicas"
    assert [e.address for e in pool.admitted()] == ["a:1", "b:2"]
    assert all(e.failures == 0 and e.ejections == 0 for e in pool.endpoints)


async def test_an_endpoints_own_failure_leaves_the_pool_naming_it_as_the_origin() -> None:
    pool = make_pool(addresses=["a:1", "b:2"])
    with pytest.raises(NoHealthyEndpoint) as every:
        await pool.call(Script({"a:1": Unavailable("refused"), "b:2": Unavailable("reset")}))
    assert every.value.origin == "worker"
    assert every.value.message.startswith("no worker is available")

    pool = make_pool(addresses=["a:1", "b:2"], max_attempts=1)
    with pytest.raises(Unavailable) as one:
        await pool.call(Script({"a:1": Unavailable("refused"), "b:2": Unavailable("refused")}))
    assert one.value.origin in ("worker a:1", "worker b:2")

    with pytest.raises(BackendError) as internal:
        await pool.call(Script({"a:1": BackendError("bad batch"), "b:2": BackendError("bad batch")}))
    assert internal.value.origin in ("worker a:1", "worker b:2")

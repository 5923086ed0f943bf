"""EndpointPool strategies, capacity, active health checks and pool status.

Complements test_endpoint_pool.py (round-robin, retries, passive ejection).
No test waits on real time except the background-loop tests of
ActiveHealthCheck.start(), which probe every few real milliseconds and wait
for the probes' effect with a deadline.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from test_endpoint_pool import ManualTime, Script, make_pool

from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import DeadlineExceeded, NoHealthyEndpoint, Unavailable
from flotilla.pool.pool import (
    STRATEGIES,
    ActiveHealthCheck,
    Endpoint,
    EndpointPool,
    LeastOutstanding,
    PowerOfTwoChoices,
    RoundRobin,
    make_strategy,
    pool_from_settings,
    strategy_name,
)
from flotilla.pool.status import pools_to_pb
from tests.waiting import until


async def settle(rounds: int = 20) -> None:
    """Let ready tasks run for a few loop iterations; no real time passes."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def endpoints_with_load(*loads: int) -> list[Endpoint[None]]:
    """Endpoints e0, e1, ... with the given calls in flight."""
    return [Endpoint(f"e{i}", None, outstanding=load) for i, load in enumerate(loads)]


class FirstCandidate:
    """A strategy that always takes the first candidate it is offered.

    Without a capacity limit it would send every call to the same endpoint,
    so spreading seen with it is the pool's doing.
    """

    def choose(self, candidates: Sequence[Endpoint]) -> Endpoint:
        return candidates[0]


class Gate:
    """A call that blocks until the test releases it, in the order calls started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._releases: list[asyncio.Event] = []

    async def __call__(self, endpoint: Endpoint[str]) -> str:
        self.started.append(endpoint.address)
        release = asyncio.Event()
        self._releases.append(release)
        await release.wait()
        return endpoint.address

    def release(self, index: int) -> None:
        """Let the ``index``-th started call return."""
        self._releases[index].set()

    def release_all(self) -> None:
        for release in self._releases:
            release.set()


class Probe:
    """An active probe whose verdict per address the test sets.

    A verdict is True/False, an exception to raise, or "hang" (never
    answers: only the probe timeout ends it).
    """

    def __init__(self, verdicts: dict[str, object] | None = None) -> None:
        self.verdicts: dict[str, object] = dict(verdicts or {})
        self.probed: list[str] = []

    async def __call__(self, endpoint: Endpoint[str]) -> bool:
        self.probed.append(endpoint.address)
        verdict = self.verdicts.get(endpoint.address, True)
        if verdict == "hang":
            await asyncio.Event().wait()
        if isinstance(verdict, BaseException):
            raise verdict
        return bool(verdict)


def health_check(pool: EndpointPool[str], probe: Probe, **kwargs) -> ActiveHealthCheck[str]:
    kwargs.setdefault("interval_s", 10.0)
    kwargs.setdefault("timeout_s", 0.5)
    return ActiveHealthCheck(pool, probe, **kwargs)


def health_tasks(pool: EndpointPool) -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == f"health:{pool.name}" and not t.done()]


# -- LeastOutstanding -------------------------------------------------------------


def test_least_outstanding_picks_the_endpoint_with_fewest_calls_in_flight() -> None:
    strategy = LeastOutstanding()
    assert strategy.choose(endpoints_with_load(2, 0, 1)).address == "e1"
    assert strategy.choose(endpoints_with_load(3, 5, 1)).address == "e2"
    assert strategy.choose(endpoints_with_load(7)).address == "e0"


def test_least_outstanding_rotates_among_ties() -> None:
    strategy = LeastOutstanding()

    idle = endpoints_with_load(0, 0, 0)
    assert [strategy.choose(idle).address for _ in range(6)] == ["e0", "e1", "e2"] * 2

    strategy = LeastOutstanding()
    busy_first = endpoints_with_load(1, 0, 0)
    assert [strategy.choose(busy_first).address for _ in range(4)] == ["e1", "e2", "e1", "e2"]


async def test_least_outstanding_spreads_concurrent_calls_and_refills_the_idle_one() -> None:
    pool = make_pool(strategy=LeastOutstanding())
    gate = Gate()

    calls = [asyncio.create_task(pool.call(gate)) for _ in range(3)]
    await settle()
    assert sorted(gate.started) == ["a:1", "b:2", "c:3"]

    gate.release(gate.started.index("b:2"))
    await settle()
    assert await calls[gate.started.index("b:2")] == "b:2"

    late = asyncio.create_task(pool.call(gate))
    await settle()
    assert gate.started[-1] == "b:2", "the only idle endpoint takes the next call"

    gate.release_all()
    await asyncio.gather(*calls, late)
    assert [e.outstanding for e in pool.endpoints] == [0, 0, 0]


# -- PowerOfTwoChoices ------------------------------------------------------------


class RecordingRandom(random.Random):
    """A seeded Random that remembers every pair it sampled."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.samples: list[list] = []

    def sample(self, population, k, **kwargs):  # type: ignore[override]
        picked = super().sample(population, k, **kwargs)
        self.samples.append(list(picked))
        return picked


def test_power_of_two_returns_the_less_loaded_of_the_two_it_samples() -> None:
    rng = RecordingRandom(seed=7)
    strategy = PowerOfTwoChoices(rng)
    endpoints = endpoints_with_load(4, 0, 2, 1, 3)

    for _ in range(200):
        chosen = strategy.choose(endpoints)
        sampled = rng.samples[-1]
        assert len(sampled) == 2 and sampled[0] is not sampled[1]
        assert chosen in sampled
        assert chosen.outstanding == min(e.outstanding for e in sampled)
    assert len(rng.samples) == 200


def test_power_of_two_never_picks_the_busiest_and_favours_the_idlest() -> None:
    """Independent of how it samples: the strictly busiest endpoint never wins a pair."""
    strategy = PowerOfTwoChoices(random.Random(3))
    endpoints = endpoints_with_load(0, 1, 2)

    counts = Counter(strategy.choose(endpoints).address for _ in range(600))

    assert counts["e2"] == 0
    assert counts["e0"] > counts["e1"] > 0  # e0 wins 2 of the 3 pairs


def test_power_of_two_with_one_candidate_returns_it() -> None:
    rng = RecordingRandom(seed=1)
    only = endpoints_with_load(9)

    assert PowerOfTwoChoices(rng).choose(only) is only[0]
    assert rng.samples == []


def test_power_of_two_steers_away_from_a_heavily_loaded_endpoint() -> None:
    strategy = PowerOfTwoChoices(random.Random(42))
    endpoints = endpoints_with_load(0, 0, 100, 0)
    picks = 1200

    counts = Counter(strategy.choose(endpoints).address for _ in range(picks))

    assert counts["e2"] < picks * 0.05
    for light in ("e0", "e1", "e3"):
        assert counts[light] > picks * 0.25, counts  # about a third each


def test_power_of_two_is_reproducible_with_the_same_seed() -> None:
    endpoints = endpoints_with_load(0, 0, 0, 0, 0)
    a, b = PowerOfTwoChoices(random.Random(5)), PowerOfTwoChoices(random.Random(5))
    assert [a.choose(endpoints).address for _ in range(50)] == [b.choose(endpoints).address for _ in range(50)]


# -- make_strategy / strategy_name ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("round_robin", RoundRobin), ("least_outstanding", LeastOutstanding), ("power_of_two", PowerOfTwoChoices)],
)
def test_make_strategy_by_name_and_the_name_round_trips(name: str, cls: type) -> None:
    strategy = make_strategy(name)
    assert type(strategy) is cls
    assert strategy_name(strategy) == name
    assert make_strategy(name) is not strategy, "each pool gets its own strategy state"


def test_strategies_lists_exactly_the_three_names() -> None:
    assert set(STRATEGIES) == {"round_robin", "least_outstanding", "power_of_two"}


def test_make_strategy_rejects_an_unknown_name_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown pool strategy 'fastest'") as info:
        make_strategy("fastest")
    for name in STRATEGIES:
        assert name in str(info.value)


def test_strategy_name_of_a_custom_strategy_is_its_class_name() -> None:
    assert strategy_name(FirstCandidate()) == "FirstCandidate"


# -- capacity (max_outstanding) ---------------------------------------------------


async def test_full_endpoints_send_concurrent_calls_elsewhere_and_queue_the_rest() -> None:
    pool = make_pool(addresses=["a:1", "b:2"], strategy=FirstCandidate(), max_outstanding=1)
    gate = Gate()

    first = asyncio.create_task(pool.call(gate))
    second = asyncio.create_task(pool.call(gate))
    await settle()
    assert gate.started == ["a:1", "b:2"], "a full endpoint is not chosen"
    assert pool.available() == []

    third = asyncio.create_task(pool.call(gate))
    await settle()
    assert gate.started == ["a:1", "b:2"], "the third call must wait for room"
    assert not third.done()
    assert [e.outstanding for e in pool.endpoints] == [1, 1]
    assert [e.calls for e in pool.endpoints] == [1, 1]

    gate.release(1)  # b:2 finishes
    await settle()
    assert await second == "b:2"
    assert gate.started == ["a:1", "b:2", "b:2"], "the waiting call takes the freed endpoint"
    assert not third.done()

    gate.release_all()
    assert await first == "a:1"
    assert await third == "b:2"
    assert [e.outstanding for e in pool.endpoints] == [0, 0]
    assert [e.calls for e in pool.endpoints] == [1, 2]


async def test_a_call_waiting_for_room_fails_when_its_deadline_passes() -> None:
    clock = ManualTime()
    pool = make_pool(clock, addresses=["a:1"], max_outstanding=1)
    gate = Gate()
    busy = asyncio.create_task(pool.call(gate))
    await settle()

    waiting = asyncio.create_task(pool.call(gate, deadline_s=clock.now_s + 5.0))
    await settle()
    assert not waiting.done(), "within its deadline the call waits for room"

    # The deadline passes while the endpoint is still full; the next wake-up
    # (here a good health probe re-admitting the endpoint) notices it.
    clock.now_s += 6.0
    await health_check(pool, Probe()).check_once()
    await settle()

    assert waiting.done()
    with pytest.raises(DeadlineExceeded, match="waiting for a free worker"):
        await waiting
    assert gate.started == ["a:1"], "the expired call never started"
    assert pool.endpoints[0].calls == 1

    gate.release_all()
    assert await busy == "a:1"
    assert pool.endpoints[0].outstanding == 0


async def test_a_call_whose_deadline_passed_while_waiting_does_not_start_when_room_frees() -> None:
    clock = ManualTime()
    pool = make_pool(clock, addresses=["a:1"], max_outstanding=1)
    gate = Gate()
    busy = asyncio.create_task(pool.call(gate))
    await settle()
    waiting = asyncio.create_task(pool.call(gate, deadline_s=clock.now_s + 5.0))
    await settle()

    clock.now_s += 6.0  # the deadline passes while a:1 is still busy...
    gate.release(0)  # ...then a:1 frees up
    await settle()

    try:
        assert gate.started == ["a:1"], "an attempt started after the call's deadline"
        with pytest.raises(DeadlineExceeded):
            await waiting
    finally:
        gate.release_all()
        await busy
        await asyncio.gather(waiting, return_exceptions=True)


async def test_a_call_that_cannot_find_room_after_its_deadline_raises_at_once() -> None:
    clock = ManualTime()
    pool = make_pool(clock, addresses=["a:1"], max_outstanding=1)
    gate = Gate()
    busy = asyncio.create_task(pool.call(gate))
    await settle()

    with pytest.raises(DeadlineExceeded):
        await pool.call(gate, deadline_s=clock.now_s)

    gate.release_all()
    await busy
    assert gate.started == ["a:1"]


# -- ActiveHealthCheck.check_once -------------------------------------------------


async def test_one_failed_probe_does_not_eject_two_in_a_row_do() -> None:
    clock = ManualTime()
    pool = make_pool(clock)
    check = health_check(pool, Probe({"b:2": False}), unhealthy_after=2)
    b = pool.endpoints[1]

    await check.check_once()
    assert b.healthy
    assert b in pool.admitted()
    assert b.ejections == 0 and b.last_ejected_s is None

    clock.now_s = 130.0
    await check.check_once()
    assert not b.healthy
    assert [e.address for e in pool.admitted()] == ["a:1", "c:3"]
    assert b.ejections == 1
    assert b.last_ejected_s == 130.0

    clock.now_s = 140.0
    await check.check_once()  # still failing: already out, not ejected again
    assert b.ejections == 1
    assert b.last_ejected_s == 130.0
    assert all(e.healthy for e in (pool.endpoints[0], pool.endpoints[2]))


async def test_an_actively_ejected_endpoint_is_not_chosen() -> None:
    pool = make_pool()
    check = health_check(pool, Probe({"b:2": False}))
    await check.check_once()
    await check.check_once()

    script = Script()
    for _ in range(6):
        await pool.call(script)
    assert "b:2" not in script.visited
    assert pool.endpoints[1].calls == 0


@pytest.mark.parametrize(
    "verdict",
    [ConnectionError("refused"), Unavailable("not serving"), "hang"],
    ids=["raises", "raises-unavailable", "times-out"],
)
async def test_a_probe_that_raises_or_times_out_counts_as_failed(verdict: object) -> None:
    pool = make_pool()
    check = health_check(pool, Probe({"a:1": verdict}), timeout_s=0.01, unhealthy_after=2)
    a = pool.endpoints[0]

    await check.check_once()
    assert a.healthy
    await check.check_once()

    assert not a.healthy
    assert a not in pool.admitted()
    assert a.ejections == 1
    assert [e.healthy for e in pool.endpoints[1:]] == [True, True]


async def test_unhealthy_after_one_ejects_on_the_first_failed_probe() -> None:
    pool = make_pool()
    await health_check(pool, Probe({"c:3": False}), unhealthy_after=1).check_once()
    assert not pool.endpoints[2].healthy


async def test_a_good_probe_readmits_an_actively_ejected_endpoint() -> None:
    clock = ManualTime()
    pool = make_pool(clock)
    probe = Probe({"a:1": False})
    check = health_check(pool, probe)
    a = pool.endpoints[0]
    await pool.call(Script({"a:1": Unavailable("blip")}))  # a fails once, b answers
    assert a.consecutive_failures == 1
    await check.check_once()
    await check.check_once()
    assert not a.healthy

    clock.now_s = 150.0
    probe.verdicts["a:1"] = True
    await check.check_once()

    assert a.healthy
    assert a in pool.admitted()
    assert a.consecutive_failures == 0
    assert a.last_admitted_s == 150.0
    assert a.ejections == 1

    # The next failure starts counting from scratch: one more bad probe is not enough.
    probe.verdicts["a:1"] = False
    await check.check_once()
    assert a.healthy


async def test_a_good_probe_on_an_admitted_endpoint_records_no_readmission() -> None:
    pool = make_pool()
    await health_check(pool, Probe()).check_once()
    assert all(e.last_admitted_s is None for e in pool.endpoints)
    assert all(e.healthy for e in pool.endpoints)


async def test_a_good_probe_clears_a_passive_ejection_so_the_endpoint_is_chosen_at_once() -> None:
    clock = ManualTime()
    pool = make_pool(clock, addresses=["a:1", "b:2"], eject_after_failures=1, eject_cooldown_s=60.0)
    await pool.call(Script({"a:1": Unavailable("blip")}))  # a fails, b answers
    a = pool.endpoints[0]
    assert a.ejected_until_s == 160.0
    assert [e.address for e in pool.admitted()] == ["b:2"]

    clock.now_s = 101.0  # well inside the cooldown
    await health_check(pool, Probe()).check_once()

    assert a.ejected_until_s == 0.0
    assert a.consecutive_failures == 0
    assert a.last_admitted_s == 101.0
    assert [e.address for e in pool.admitted()] == ["a:1", "b:2"]
    script = Script()
    await pool.call(script)
    await pool.call(script)
    assert "a:1" in script.visited


async def test_a_good_probe_in_between_resets_the_failed_probe_count() -> None:
    pool = make_pool()
    probe = Probe({"a:1": False})
    check = health_check(pool, probe, unhealthy_after=2)
    a = pool.endpoints[0]

    for verdict in [False, True, False, True, False]:
        probe.verdicts["a:1"] = verdict
        await check.check_once()
        assert a.healthy, "failed probes that are not consecutive never eject"

    probe.verdicts["a:1"] = False
    await check.check_once()
    assert not a.healthy
    assert a.ejections == 1


async def test_check_once_probes_every_endpoint_concurrently() -> None:
    pool = make_pool()
    probe = Probe({"a:1": "hang", "b:2": "hang", "c:3": "hang"})
    check = health_check(pool, probe, timeout_s=0.01, unhealthy_after=1)

    await check.check_once()  # three 10 ms timeouts side by side

    assert sorted(probe.probed) == ["a:1", "b:2", "c:3"]
    assert not any(e.healthy for e in pool.endpoints)


async def test_an_endpoint_whose_calls_succeeded_since_the_last_round_is_not_probed() -> None:
    clock = ManualTime()
    pool = make_pool(clock)
    probe = Probe()
    check = health_check(pool, probe, interval_s=0.25)
    busy = pool.endpoints[0]
    pool.strategy = FirstCandidate()

    assert await pool.call(Script()) == "answer from client-a:1"
    assert busy.last_success_s == 100.0
    clock.now_s = 100.2
    await check.check_once()
    assert sorted(probe.probed) == ["b:2", "c:3"], "the traffic answered for a:1"

    clock.now_s = 100.5  # no call for longer than the interval: probed again
    probe.probed.clear()
    await check.check_once()
    assert sorted(probe.probed) == ["a:1", "b:2", "c:3"]


def a_first_pool_with_a_failing_probe(clock: ManualTime) -> tuple[EndpointPool[str], Probe, ActiveHealthCheck[str]]:
    """Calls go to a:1 first; its probe fails and one failed probe ejects."""
    pool = make_pool(clock)
    pool.strategy = FirstCandidate()
    probe = Probe({"a:1": False})
    return pool, probe, health_check(pool, probe, interval_s=0.25, unhealthy_after=1)


async def test_an_endpoint_with_a_failed_call_is_probed_though_others_succeeded_since() -> None:
    """A draining replica answers new calls UNAVAILABLE while its open ones still finish."""
    clock = ManualTime()
    pool, probe, check = a_first_pool_with_a_failing_probe(clock)
    draining = Script({"a:1": Unavailable("a:1 is shutting down")})

    assert await pool.call(draining) == "answer from client-b:2", "retried on the next endpoint"
    clock.now_s = 100.1
    assert await pool.call(Script()) == "answer from client-a:1", "an open call on a:1 finishes"
    await check.check_once()
    assert "a:1" in probe.probed
    assert pool.endpoints[0] not in pool.admitted(), "the probe saw it draining and ejected it"


async def test_an_ejected_endpoint_is_probed_whatever_its_past_traffic() -> None:
    pool, probe, check = a_first_pool_with_a_failing_probe(ManualTime())
    await pool.call(Script())

    pool.eject(pool.endpoints[0], "a test")
    await check.check_once()
    assert "a:1" in probe.probed

    probe.verdicts["a:1"] = True
    await check.check_once()
    assert pool.endpoints[0] in pool.admitted()


# -- panic mode: every endpoint ejected ------------------------------------------


async def eject_all_actively(pool: EndpointPool[str]) -> None:
    check = health_check(pool, Probe({e.address: False for e in pool.endpoints}), unhealthy_after=1)
    await check.check_once()
    assert pool.admitted() == []


async def test_with_every_endpoint_ejected_a_call_still_tries_each_once_and_can_succeed() -> None:
    pool = make_pool(strategy=FirstCandidate())  # tries a, b, c in that order
    await eject_all_actively(pool)
    script = Script({"a:1": Unavailable("down"), "b:2": Unavailable("down")})

    assert await pool.call(script) == "answer from client-c:3"

    assert script.visited == ["a:1", "b:2", "c:3"]


async def test_with_every_endpoint_ejected_and_failing_the_error_names_all_addresses() -> None:
    pool = make_pool()
    await eject_all_actively(pool)
    script = Script({a: Unavailable("refused") for a in ["a:1", "b:2", "c:3"]})

    with pytest.raises(NoHealthyEndpoint) as info:
        await pool.call(script)

    assert sorted(script.visited) == ["a:1", "b:2", "c:3"]
    for address in ["a:1", "b:2", "c:3"]:
        assert address in info.value.message
    assert "worker" in info.value.message


async def test_panic_mode_covers_a_mix_of_active_and_passive_ejections() -> None:
    pool = make_pool(addresses=["a:1", "b:2"], eject_after_failures=1, eject_cooldown_s=60.0)
    await health_check(pool, Probe({"a:1": False}), unhealthy_after=1).check_once()  # a: out by probe

    script = Script({"b:2": Unavailable("down")})
    assert await pool.call(script) == "answer from client-a:1"
    # b, the only admitted one, failed and was ejected passively; with none
    # admitted left, the probe-ejected a was tried as well and answered.
    assert script.visited == ["b:2", "a:1"]
    assert pool.admitted() == []

    failing = Script({"a:1": Unavailable("refused"), "b:2": Unavailable("refused")})
    with pytest.raises(NoHealthyEndpoint) as info:
        await pool.call(failing)
    assert sorted(failing.visited) == ["a:1", "b:2"]
    assert "a:1" in info.value.message and "b:2" in info.value.message


# -- ActiveHealthCheck.start / stop -----------------------------------------------


async def test_start_probes_in_the_background_and_stop_ends_it() -> None:
    pool = make_pool()
    probe = Probe({"b:2": False})
    check = health_check(pool, probe, interval_s=0.01, timeout_s=0.5)

    check.start()
    try:
        await until(lambda: not pool.endpoints[1].healthy, 5, "repeated background probes eject b")
        assert set(probe.probed) == {"a:1", "b:2", "c:3"}
    finally:
        await check.stop()

    assert health_tasks(pool) == []
    probed = len(probe.probed)
    await asyncio.sleep(0.03)  # duration: three probe intervals pass, and no probe with them
    assert len(probe.probed) == probed, "no probes after stop()"


async def test_start_twice_runs_one_loop_and_stop_is_idempotent() -> None:
    pool = make_pool()
    check = health_check(pool, Probe(), interval_s=0.01)

    await check.stop()  # before start: nothing to do

    check.start()
    check.start()
    try:
        assert len(health_tasks(pool)) == 1
    finally:
        await check.stop()
    await check.stop()
    assert health_tasks(pool) == []


async def test_stop_cancels_a_probe_in_flight() -> None:
    pool = make_pool(addresses=["a:1"])
    entered = asyncio.Event()
    cancelled: list[bool] = []

    async def stuck_probe(endpoint: Endpoint[str]) -> bool:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return True

    check = ActiveHealthCheck(pool, stuck_probe, interval_s=0.01, timeout_s=30.0)
    check.start()
    await asyncio.wait_for(entered.wait(), 1.0)

    await check.stop()

    assert cancelled == [True]
    assert health_tasks(pool) == []
    assert pool.endpoints[0].healthy, "a cancelled probe is not a failed probe"


async def test_a_stopped_check_can_be_started_again() -> None:
    pool = make_pool(addresses=["a:1"])
    probe = Probe()
    check = health_check(pool, probe, interval_s=0.01)
    check.start()
    await settle()
    await check.stop()
    probed = len(probe.probed)

    check.start()
    try:
        await settle()
        assert len(probe.probed) > probed
    finally:
        await check.stop()


# -- pool_from_settings -----------------------------------------------------------


async def noop_probe(endpoint: Endpoint[str]) -> bool:
    return True


CLIENTS = {"a:1": "client-a", "b:2": "client-b"}


def test_pool_from_settings_applies_the_pool_settings() -> None:
    settings = PoolSettings(
        strategy="least_outstanding",
        max_attempts=5,
        eject_after_failures=4,
        eject_cooldown_s=7.5,
        health_check_interval_s=0.3,
        health_check_timeout_s=0.2,
    )

    pool, check = pool_from_settings("preprocess worker", CLIENTS, settings, noop_probe)

    assert pool.name == "preprocess worker"
    assert [e.address for e in pool.endpoints] == ["a:1", "b:2"]
    assert [e.client for e in pool.endpoints] == ["client-a", "client-b"]
    assert isinstance(pool.strategy, LeastOutstanding)
    assert strategy_name(pool.strategy) == "least_outstanding"
    assert pool.max_attempts == 5
    assert pool.eject_after_failures == 4
    assert pool.eject_cooldown_s == 7.5
    assert pool.max_outstanding is None
    assert check.pool is pool
    assert check.probe is noop_probe
    assert check.interval_s == 0.3
    assert check.timeout_s == 0.2


def test_pool_from_settings_defaults() -> None:
    defaults = PoolSettings()
    pool, check = pool_from_settings("worker", CLIENTS, defaults, noop_probe)

    assert strategy_name(pool.strategy) == defaults.strategy
    assert pool.max_attempts == defaults.max_attempts
    assert pool.eject_after_failures == defaults.eject_after_failures
    assert pool.eject_cooldown_s == defaults.eject_cooldown_s
    assert check.interval_s == defaults.health_check_interval_s
    assert check.timeout_s == defaults.health_check_timeout_s


async def test_pool_from_settings_does_not_start_the_check() -> None:
    pool, _check = pool_from_settings("idle pool", CLIENTS, PoolSettings(), noop_probe)
    await settle()
    assert health_tasks(pool) == []


def test_pool_from_settings_applies_the_per_model_strategy_and_capacity() -> None:
    settings = PoolSettings(strategy="round_robin")
    backend = BackendSettings(strategy="power_of_two", instance_groups=2, predict_concurrency=3)

    pool, _ = pool_from_settings(
        "Triton[m]", CLIENTS, settings, noop_probe,
        strategy=backend.strategy,
        max_outstanding=backend.instance_groups * backend.predict_concurrency,
    )

    assert isinstance(pool.strategy, PowerOfTwoChoices)
    assert pool.max_outstanding == 6


def test_pool_from_settings_falls_back_to_the_pool_strategy_without_an_override() -> None:
    settings = PoolSettings(strategy="least_outstanding")
    pool, _ = pool_from_settings("Triton[m]", CLIENTS, settings, noop_probe, strategy=BackendSettings().strategy)
    assert isinstance(pool.strategy, LeastOutstanding)


def test_pool_from_settings_rejects_an_unknown_strategy_override() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        pool_from_settings("worker", CLIENTS, PoolSettings(), noop_probe, strategy="random")


# -- pools_to_pb ------------------------------------------------------------------


async def test_pools_to_pb_reports_each_pool_and_endpoint() -> None:
    clock = ManualTime()
    workers = make_pool(clock, addresses=["a:1", "b:2"], strategy=LeastOutstanding(),
                        eject_after_failures=1, eject_cooldown_s=30.0)
    triton = EndpointPool("Triton[m]", {"t:1": "client-t"}, strategy=RoundRobin(), max_outstanding=4, clock=clock)

    await workers.call(Script({"a:1": Unavailable("blip")}))  # a fails (ejected), b answers
    gate = Gate()
    in_flight = asyncio.create_task(triton.call(gate))
    await settle()

    try:
        reply = pools_to_pb([workers, triton])
    finally:
        gate.release_all()
        await in_flight

    assert [p.name for p in reply.pools] == ["worker", "Triton[m]"]
    w, t = reply.pools
    assert w.strategy == "least_outstanding"
    assert w.max_outstanding == 0, "unlimited is reported as 0"
    assert [
        (e.address, e.admitted, e.outstanding, e.calls, e.failures, e.ejections) for e in w.endpoints
    ] == [("a:1", False, 0, 1, 1, 1), ("b:2", True, 0, 1, 0, 0)]

    assert t.strategy == "round_robin"
    assert t.max_outstanding == 4
    assert [
        (e.address, e.admitted, e.outstanding, e.calls, e.failures, e.ejections) for e in t.endpoints
    ] == [("t:1", True, 1, 1, 0, 0)]


async def test_pools_to_pb_reports_actively_ejected_endpoints_as_not_admitted() -> None:
    pool = make_pool(strategy=PowerOfTwoChoices(random.Random(0)))
    await health_check(pool, Probe({"c:3": False}), unhealthy_after=1).check_once()

    (status,) = pools_to_pb([pool]).pools

    assert status.strategy == "power_of_two"
    assert [(e.address, e.admitted, e.ejections) for e in status.endpoints] == [
        ("a:1", True, 0), ("b:2", True, 0), ("c:3", False, 1),
    ]


def test_pools_to_pb_of_no_pools_is_empty() -> None:
    assert list(pools_to_pb([]).pools) == []

"""A pool of interchangeable endpoints: choose one, call it, retry elsewhere.

One mechanism for every hop that spreads work over replicas (router →
batchers, batcher → preprocess workers, preprocess → Triton). It imports no
grpc: the caller's function talks to the endpoint and raises
``flotilla.errors.Unavailable`` when the endpoint could not serve the call.

- Choosing: a strategy picks among endpoints that are admitted and below
  their capacity (``max_outstanding``); when every admitted endpoint is full
  the call waits for a free one (within its deadline), so work queues here,
  not in the backend.
- Retrying: only Unavailable is retried, on an endpoint not yet tried, for
  at most ``max_attempts`` attempts and never past the caller's deadline.
- Whose failure: an Unavailable that names an ``origin`` is a failure the
  endpoint relays from below it (its worker, the object store, Triton): the
  endpoint answered, so it is neither counted against it nor retried here
  (the tier below already tried its replicas); the caller gets it as it
  came. Every error leaving the pool names the pool's endpoint (or the
  pool) as its origin unless it already names one.
- Ejecting: ``eject_after_failures`` failures in a row eject an endpoint
  (passive check); an ActiveHealthCheck ejects it on a failed probe and
  re-admits it on a good one. Without active checks an ejected endpoint is
  tried again after ``eject_cooldown_s``.
- With no admitted endpoint at all, a call still tries each endpoint once
  (a dead one refuses at once), then fails with UNAVAILABLE naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from flotilla.common import metrics
from flotilla.common.tasks import cancel_and_wait
from flotilla.config import PoolSettings
from flotilla.errors import DeadlineExceeded, FlotillaError, NoHealthyEndpoint, Unavailable
from flotilla.pool.logsummary import FailureSummary

log = logging.getLogger(__name__)

C = TypeVar("C")
R = TypeVar("R")


@dataclass(eq=False)
class Endpoint(Generic[C]):
    """One replica and the client that talks to it."""

    address: str
    client: C
    outstanding: int = 0
    """Calls in flight on this endpoint."""
    consecutive_failures: int = 0
    ejected_until_s: float = 0.0
    """Clock time before which the endpoint is not chosen (passive ejection)."""
    healthy: bool = True
    """The last active probe's verdict."""
    calls: int = 0
    """Calls started on this endpoint so far."""
    last_success_s: float | None = None
    """Clock time the last call on this endpoint succeeded."""
    last_failure_s: float | None = None
    """Clock time the last call on this endpoint failed with Unavailable."""
    failures: int = 0
    """Calls that failed with Unavailable so far."""
    ejections: int = 0
    last_ejected_s: float | None = None
    last_admitted_s: float | None = None


class Strategy(Protocol):
    def choose(self, candidates: Sequence[Endpoint[C]]) -> Endpoint[C]:
        """Pick one of ``candidates`` (never empty)."""
        ...


class RoundRobin:
    """The n-th choice takes ``candidates[n mod len(candidates)]``.

    With a stable candidate list this visits every endpoint in turn; when an
    endpoint is ejected the rotation continues over the rest.
    """

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[Endpoint[C]]) -> Endpoint[C]:
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding:
    """The candidate with the fewest calls in flight; ties go round-robin."""

    def __init__(self) -> None:
        self._tie_break = RoundRobin()

    def choose(self, candidates: Sequence[Endpoint[C]]) -> Endpoint[C]:
        fewest = min(e.outstanding for e in candidates)
        return self._tie_break.choose([e for e in candidates if e.outstanding == fewest])


class PowerOfTwoChoices:
    """Two candidates at random; the one with fewer calls in flight.

    Nearly as balanced as least-outstanding without scanning every endpoint,
    and it does not herd every caller onto the same momentarily idle one.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Endpoint[C]]) -> Endpoint[C]:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if a.outstanding <= b.outstanding else b


STRATEGIES: dict[str, type[Strategy]] = {
    "round_robin": RoundRobin,
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwoChoices,
}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown pool strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


class EndpointPool(Generic[C]):
    """Spreads calls over endpoints with a strategy, retrying UNAVAILABLE elsewhere."""

    def __init__(
        self,
        name: str,
        clients: dict[str, C],
        *,
        strategy: Strategy | None = None,
        max_attempts: int = 3,
        eject_after_failures: int = 3,
        eject_cooldown_s: float = 2.0,
        max_outstanding: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.endpoints: list[Endpoint[C]] = []
        self.strategy: Strategy = strategy or RoundRobin()
        self.max_attempts = max_attempts
        self.eject_after_failures = eject_after_failures
        self.eject_cooldown_s = eject_cooldown_s
        self.max_outstanding = max_outstanding
        """Calls in flight allowed per endpoint; None = unlimited."""
        self._clock = clock
        self._changed = asyncio.Condition()
        self._waiting = 0
        """Calls waiting for room (``_endpoint_for``); only then does a finished call wake anyone."""
        self._failures = FailureSummary(log, clock=clock)
        """Failed calls, summarised per endpoint and interval (state changes are logged apart)."""
        self.endpoints = [self._track(Endpoint(address, client)) for address, client in clients.items()]

    def _track(self, endpoint: Endpoint[C]) -> Endpoint[C]:
        """Export the endpoint's admission state (read live at scrape time)."""
        metrics.ENDPOINT_ADMITTED.labels(self.name, endpoint.address).set_function(
            lambda: 1.0 if self._is_admitted(endpoint) else 0.0
        )
        metrics.EJECTIONS.labels(self.name, endpoint.address)  # at 0: a first ejection shows in rate()
        return endpoint

    # -- membership --------------------------------------------------------------

    def set_endpoints(self, clients: dict[str, C]) -> list[C]:
        """Make the pool exactly these endpoints (a changing set of replicas).

        Endpoints still present keep their state and in-flight calls; new ones
        are admitted at once. Returns the clients of endpoints that left (the
        caller closes them once their calls are done).
        """
        kept = {e.address: e for e in self.endpoints if e.address in clients}
        removed = [e.client for e in self.endpoints if e.address not in clients]
        for endpoint in self.endpoints:
            if endpoint.address not in clients:
                metrics.ENDPOINT_ADMITTED.remove(self.name, endpoint.address)
                metrics.EJECTIONS.remove(self.name, endpoint.address)
        self.endpoints = [kept.get(a) or self._track(Endpoint(a, c)) for a, c in clients.items()]
        if removed or len(kept) != len(clients):
            log.info("%s: endpoints now %s", self.name, ", ".join(clients) or "none")
            asyncio.get_running_loop().create_task(self._notify())
        return removed

    # -- admission ---------------------------------------------------------------

    def admitted(self) -> list[Endpoint[C]]:
        now = self._clock()
        return [e for e in self.endpoints if e.healthy and e.ejected_until_s <= now]

    def available(self) -> list[Endpoint[C]]:
        """Admitted endpoints with room for one more call."""
        return [e for e in self.admitted() if self.max_outstanding is None or e.outstanding < self.max_outstanding]

    def _is_admitted(self, endpoint: Endpoint[C]) -> bool:
        return endpoint.healthy and endpoint.ejected_until_s <= self._clock()

    def served_cleanly(self, endpoint: Endpoint[C], within_s: float) -> bool:
        """Admitted, and within the last ``within_s`` a call on it succeeded and none failed."""
        since = self._clock() - within_s
        success, failure = endpoint.last_success_s, endpoint.last_failure_s
        return (
            success is not None and success > since and (failure is None or failure <= since)
            and self._is_admitted(endpoint)
        )

    def eject(self, endpoint: Endpoint[C], reason: str) -> None:
        if self._is_admitted(endpoint):  # count each ejection once, however it came
            endpoint.ejections += 1
            metrics.EJECTIONS.labels(self.name, endpoint.address).inc()
            endpoint.last_ejected_s = self._clock()
            log.warning("%s %s ejected: %s", self.name, endpoint.address, reason)
        endpoint.healthy = False

    async def admit(self, endpoint: Endpoint[C]) -> None:
        """Let the endpoint be chosen again (a good probe). An endpoint that was
        admitted already keeps its count of failed calls."""
        if not self._is_admitted(endpoint):
            endpoint.last_admitted_s = self._clock()
            endpoint.consecutive_failures = 0
            log.warning("%s %s admitted", self.name, endpoint.address)
        endpoint.healthy = True
        endpoint.ejected_until_s = 0.0
        await self._notify()

    async def _notify(self) -> None:
        if not self._waiting:
            return  # the common case on every call: nobody to wake, no lock to take
        async with self._changed:
            self._changed.notify_all()

    # -- calls -------------------------------------------------------------------

    def _choose(self, tried: set[int]) -> tuple[bool, Endpoint[C] | None]:
        """(decided, endpoint): an endpoint not yet tried with room for a call; (True, None) when none
        is left to try, (False, None) when every one left is full (a call must wait for room)."""
        # With none admitted (all ejected, or probes that flaked), every
        # endpoint is tried once more: a dead one fails fast anyway.
        pool = self.admitted() or self.endpoints
        admitted = [e for e in pool if id(e) not in tried]
        if not admitted:
            return True, None
        free = [e for e in admitted if self.max_outstanding is None or e.outstanding < self.max_outstanding]
        return (True, self.strategy.choose(free)) if free else (False, None)

    async def _endpoint_for(self, tried: set[int], deadline_s: float | None) -> Endpoint[C] | None:
        """An endpoint not yet tried with room for a call, waiting for room if needed."""
        while True:
            if deadline_s is not None and self._clock() >= deadline_s:
                raise DeadlineExceeded(f"deadline passed waiting for a free {self.name}")
            decided, endpoint = self._choose(tried)
            if decided:
                return endpoint
            timeout = None if deadline_s is None else deadline_s - self._clock()
            self._waiting += 1
            try:
                async with self._changed:
                    with contextlib.suppress(asyncio.TimeoutError):
                        # Woken when a call ends or an endpoint is admitted; the
                        # cap on the wait also notices cooldowns that ran out.
                        await asyncio.wait_for(self._changed.wait(), min(timeout or 1.0, 1.0))
            finally:
                self._waiting -= 1

    async def call(
        self,
        fn: Callable[[Endpoint[C]], Awaitable[R]],
        *,
        deadline_s: float | None = None,
    ) -> R:
        """Run ``fn`` on a chosen endpoint; on Unavailable try another one.

        ``deadline_s`` is an absolute time on this pool's clock; no attempt
        starts after it.
        """
        tried: set[int] = set()
        last_error: Unavailable | None = None
        last_endpoint: Endpoint[C] | None = None
        for _ in range(self.max_attempts):
            if deadline_s is not None and self._clock() >= deadline_s:
                raise DeadlineExceeded(f"deadline passed before {self.name} could answer", origin=self.name)
            decided, endpoint = self._choose(tried)  # on every call: no coroutine unless it must wait
            if not decided:
                endpoint = await self._endpoint_for(tried, deadline_s)
            if endpoint is None:
                break
            tried.add(id(endpoint))
            endpoint.outstanding += 1
            endpoint.calls += 1
            try:
                result = await fn(endpoint)
            except Unavailable as exc:
                if exc.origin:  # relayed from below: the endpoint answered, the part under it failed
                    self._answered(endpoint)
                    raise
                last_error, last_endpoint = exc, endpoint
                self._record_failure(endpoint, exc)
                continue
            except FlotillaError as exc:  # not retried, not counted (a deadline, a bad request, ...)
                exc.from_below(f"{self.name} {endpoint.address}")
                raise
            finally:
                endpoint.outstanding -= 1
                if self._waiting:
                    await self._notify()
            self._answered(endpoint)
            return result
        if not self.endpoints:
            raise NoHealthyEndpoint(f"no {self.name} is available: there are none right now", origin=self.name)
        if last_error is not None and last_endpoint is not None and len(tried) < len(self.endpoints):
            raise last_error.from_below(f"{self.name} {last_endpoint.address}")
        if last_error is not None:
            raise NoHealthyEndpoint(
                f"no {self.name} is available: all {len(self.endpoints)} failed or are ejected "
                f"({', '.join(e.address for e in self.endpoints)}); last error: {last_error.message}",
                origin=self.name,
            ) from last_error
        raise NoHealthyEndpoint(
            f"no {self.name} is available: all {len(self.endpoints)} are down or ejected "
            f"({', '.join(e.address for e in self.endpoints)})",
            origin=self.name,
        )

    def _answered(self, endpoint: Endpoint[C]) -> None:
        """The endpoint answered the call: with its result, or with a failure it relays from below."""
        endpoint.consecutive_failures = 0
        endpoint.last_success_s = self._clock()

    def _record_failure(self, endpoint: Endpoint[C], error: Exception) -> None:
        self._failures.note(f"{self.name} {endpoint.address}", f"call failed: {error}")
        endpoint.failures += 1
        endpoint.consecutive_failures += 1
        endpoint.last_failure_s = self._clock()
        if endpoint.consecutive_failures >= self.eject_after_failures:
            # Logged once per ejection (a state change), not once per failed call.
            if self._is_admitted(endpoint):
                endpoint.ejections += 1
                metrics.EJECTIONS.labels(self.name, endpoint.address).inc()
                endpoint.last_ejected_s = self._clock()
                log.warning("%s %s ejected after %d failures in a row: %s", self.name, endpoint.address,
                            endpoint.consecutive_failures, error)
            endpoint.ejected_until_s = self._clock() + self.eject_cooldown_s


Probe = Callable[[Endpoint[C]], Awaitable[bool]]


class ActiveHealthCheck(Generic[C]):
    """Probes every endpoint of a pool on an interval; ejects and re-admits.

    ``unhealthy_after`` probes in a row that fail, raise or exceed
    ``timeout_s`` eject the endpoint; the first good probe afterwards admits
    it again. An admitted endpoint whose calls succeeded, and none failed,
    within the last interval is not probed: its traffic answered for it (in the
    saturated bench mesh, probes off saved the batcher ~25 CPU-us per image,
    8% of it). Once its calls stop, or one fails (a replica draining answers
    UNAVAILABLE while its open calls still finish), the next round probes it
    as before.
    """

    def __init__(
        self,
        pool: EndpointPool[C],
        probe: Probe[C],
        *,
        interval_s: float,
        timeout_s: float,
        unhealthy_after: int = 2,
    ) -> None:
        self.pool = pool
        self.probe = probe
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unhealthy_after = unhealthy_after
        self._failed_probes: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"health:{self.pool.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def check_once(self) -> None:
        await asyncio.gather(*(self._check(e) for e in self.pool.endpoints))

    async def _check(self, endpoint: Endpoint[C]) -> None:
        if self.pool.served_cleanly(endpoint, self.interval_s):
            self._failed_probes[id(endpoint)] = 0
            return
        try:
            ok = await asyncio.wait_for(self.probe(endpoint), self.timeout_s)
        except Exception as exc:  # any probe failure means "not serving"
            ok, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "probe reported not ready"
        if ok:
            self._failed_probes[id(endpoint)] = 0
            await self.pool.admit(endpoint)
            return
        failed = self._failed_probes.get(id(endpoint), 0) + 1
        self._failed_probes[id(endpoint)] = failed
        if failed >= self.unhealthy_after:
            self.pool.eject(endpoint, why)

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval_s)


def pool_from_settings(
    name: str,
    clients: dict[str, C],
    settings: PoolSettings,
    probe: Probe[C],
    *,
    strategy: str | None = None,
    max_outstanding: int | None = None,
) -> tuple[EndpointPool[C], ActiveHealthCheck[C]]:
    """A pool configured by ``settings`` and the active check that watches it (not started)."""
    pool = EndpointPool(
        name,
        clients,
        strategy=make_strategy(strategy or settings.strategy),
        max_attempts=settings.max_attempts,
        eject_after_failures=settings.eject_after_failures,
        eject_cooldown_s=settings.eject_cooldown_s,
        max_outstanding=max_outstanding,
    )
    check = ActiveHealthCheck(
        pool,
        probe,
        interval_s=settings.health_check_interval_s,
        timeout_s=settings.health_check_timeout_s,
        unhealthy_after=settings.health_check_unhealthy_after,
    )
    return pool, check


def strategy_name(strategy: Strategy) -> str:
    return next((name for name, cls in STRATEGIES.items() if isinstance(strategy, cls)), type(strategy).__name__)

"""A pool of interchangeable endpoints: choose one, call it, retry elsewhere.

One mechanism for every hop that spreads work over replicas (router →
batchers, batcher → preprocess workers, preprocess → Triton). It imports no
grpc: the caller's function talks to the endpoint and raises
``flotilla.errors.Unavailable`` when the endpoint could not serve the call;
only those failures are retried, on an endpoint not yet tried, and only
while attempts and the caller's deadline last. An endpoint that fails
``eject_after_failures`` times in a row is left out for ``eject_cooldown_s``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from flotilla.errors import DeadlineExceeded, NoHealthyEndpoint, Unavailable

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
    """Clock time before which the endpoint is not chosen."""
    calls: int = 0
    """Calls started on this endpoint so far."""


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not clients:
            raise ValueError(f"{name}: a pool needs at least one endpoint")
        self.name = name
        self.endpoints = [Endpoint(address, client) for address, client in clients.items()]
        self.strategy: Strategy = strategy or RoundRobin()
        self.max_attempts = max_attempts
        self.eject_after_failures = eject_after_failures
        self.eject_cooldown_s = eject_cooldown_s
        self._clock = clock

    def available(self) -> list[Endpoint[C]]:
        now = self._clock()
        return [e for e in self.endpoints if e.ejected_until_s <= now]

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
        for _ in range(self.max_attempts):
            if deadline_s is not None and self._clock() >= deadline_s:
                raise DeadlineExceeded(f"deadline passed before {self.name} could answer")
            candidates = [e for e in self.available() if id(e) not in tried]
            if not candidates:
                break
            endpoint = self.strategy.choose(candidates)
            tried.add(id(endpoint))
            endpoint.outstanding += 1
            endpoint.calls += 1
            try:
                result = await fn(endpoint)
            except Unavailable as exc:
                last_error = exc
                self._record_failure(endpoint)
                continue
            finally:
                endpoint.outstanding -= 1
            endpoint.consecutive_failures = 0
            return result
        if last_error is not None:
            raise last_error
        raise NoHealthyEndpoint(
            f"no {self.name} endpoint is available: all {len(self.endpoints)} are ejected "
            f"after repeated failures ({', '.join(e.address for e in self.endpoints)})"
        )

    def _record_failure(self, endpoint: Endpoint[C]) -> None:
        endpoint.consecutive_failures += 1
        if endpoint.consecutive_failures >= self.eject_after_failures:
            endpoint.ejected_until_s = self._clock() + self.eject_cooldown_s

"""The router's one way to a batcher: one Classify body, forwarded unparsed (no grpc here).

Every front door of the router ends here: the unary ``Classify`` call, each
request on a ``ClassifyStream``, and each image of a KServe v2 ``ModelInfer``
(gRPC, its stream, or HTTP). ``Forwarder.call`` picks a batching shard of the
model from the route table and sends the body as a frame on this router's
relay stream to it, with what is left of the caller's deadline; the shard's
status comes back as a ``FlotillaError`` of the same code, message and origin.
A call that fails UNAVAILABLE because its model moved goes again on the
model's pool now; one whose model has no shard that answers waits, within
its deadline, for the controller to move the model, while the fleet has
another shard that could take it (``Forwarder.move_hold_s``); a waiting call
gives its place in the router's admission limit back meanwhile (other models'
calls are not refused for it) and at most ``max_held_calls`` wait at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from flotilla.common import tracing
from flotilla.common.interceptors import place_given_back
from flotilla.common.relay import RelayClient
from flotilla.common.wire import AUTH_HEADER, CLASSIFY_METHOD
from flotilla.errors import DeadlineExceeded, NoHealthyEndpoint, Unavailable
from flotilla.pool.pool import Endpoint, EndpointPool
from flotilla.services.router.keys import KeyBook, KeyGrant
from flotilla.services.router.routing import ApiKeys, RouteTable

DROPPED_HEADERS = frozenset({AUTH_HEADER, "user-agent", "grpc-accept-encoding", "content-type", "te"})
"""Headers not passed downstream: credentials stop at the router; the caller's user agent and
encodings describe its connection, not the call."""

ROUTE_MOVES = 3
"""How many times one call follows its model to a new pool after failing UNAVAILABLE on the one it
started on (each move a change of the model's shards while the call was under way)."""

MoveTargets = Callable[[str], Collection[str]]
"""The batching shards a model's queue could move to: the fleet's, less those dedicated to another model."""

TimeRemaining = Callable[[], float | None]
"""Seconds left of the caller's deadline (None: no deadline), asked again before each attempt."""


class RelayPeer(Protocol):
    """What the forwarder needs of a batcher endpoint's client: its relay stream."""

    @property
    def relay(self) -> RelayClient: ...


P = TypeVar("P", bound=RelayPeer)


def no_deadline() -> float | None:
    return None


def no_shards(model: str) -> Collection[str]:
    return ()


def passed_headers(headers: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    """The caller's headers a batcher gets: text ones only (a binary -bin header has no reader below
    and no place in a relay frame), less ``DROPPED_HEADERS``; the trace context becomes the router's."""
    passed = [(k, v) for k, v in headers if isinstance(v, str) and k not in DROPPED_HEADERS]
    return list(tracing.inject(passed)) if tracing.enabled() else passed


class Forwarder(Generic[P]):
    """Who may call which model (the key book) and the batchers a model's calls go to (the route table).

    Every front door asks ``authorize`` once per request, when it knows the request's model (a
    stream: per request, not per stream); ``check_key`` only authenticates (a stream's opening).
    """

    def __init__(
        self, keys: KeyBook | ApiKeys, routes: RouteTable[P], *, move_hold_s: float = 0.0, shards: MoveTargets = no_shards,
        max_held_calls: int = 0,
    ) -> None:
        self.keys = keys if isinstance(keys, KeyBook) else KeyBook(keys, clock=time.monotonic, unix_clock=time.time)
        self.routes = routes
        self.move_hold_s = move_hold_s
        """How long a call waits, within its deadline, for its model to move when no shard of the model
        answers (every one down or ejected) and ``shards`` names another it could move to; with no
        other shard, or 0, it fails UNAVAILABLE at once."""
        self.shards = shards
        self.max_held_calls = max_held_calls
        """At most this many calls wait for a move at once (0: no bound); past it a call fails
        UNAVAILABLE at once, as with no other shard. A waiting call gives its place in the admission
        limit back (``interceptors.place_given_back``): a dead shard's model does not fill the router
        with calls that wait while other models' calls are refused."""
        self.held = 0
        """Calls waiting for their model to move now."""

    def check_key(self, authorization: str | None) -> KeyGrant:
        """The caller's grant; ``Unauthenticated`` unless ``authorization`` is ``Bearer <a valid key>``.
        Takes nothing of the key's quota and checks no model (``authorize`` does, per request)."""
        return self.keys.authenticate(authorization)[0]

    def authorize(self, authorization: str | None, model: str | None) -> KeyGrant:
        """The caller's grant for one request to ``model``: ``Unauthenticated``, ``PermissionDenied``
        (the key may not call it) or ``QuotaExceeded`` (over its rate) otherwise."""
        return self.keys.authorize(authorization, model)

    def scope(self, authorization: str | None) -> Callable[[str], bool]:
        """Which models the caller's key may call (``KeyBook.scope``); takes nothing of its quota."""
        return self.keys.scope(authorization)

    def check_model(self, model: str | None) -> None:
        """Raises ``InvalidArgument`` (no model) or ``ModelNotFound`` (not routed) before any work is done."""
        self.routes.pool_for(model)

    async def call(
        self,
        model: str | None,
        raw: bytes,
        headers: Sequence[tuple[str, str]],
        time_remaining: TimeRemaining = no_deadline,
        method: str = CLASSIFY_METHOD,
    ) -> bytes:
        """The answer of a batcher of ``model`` to ``method`` with the body ``raw`` (a serialised
        ClassifyRequest), or its status as a ``FlotillaError``. ``headers`` go with it as they are
        (``passed_headers`` makes them from a caller's)."""
        pool = self.routes.pool_for(model)

        async def on(endpoint: Endpoint[P]) -> bytes:
            # Each attempt gets what is left of the caller's deadline, not the whole of it.
            timeout_s = time_remaining()
            if timeout_s is not None and timeout_s <= 0:
                raise DeadlineExceeded("deadline passed before a batcher could answer")
            # The pool retries the batcher's own UNAVAILABLE (a broken stream, a batcher shutting down)
            # on another batcher; one the batcher relays from below (its worker, S3, Triton: an origin)
            # reaches the caller as it came.
            return await endpoint.client.relay.call(method, raw, headers, timeout_s)

        for _ in range(ROUTE_MOVES):
            try:
                return await pool.call(on)
            except Unavailable as exc:
                # The model moved while the call was under way (its shard went silent, or the
                # controller spread it anew): the pool it started on may be closed, or hold only the
                # shard it left. It goes again on the model's pool now, within its deadline.
                moved = self.routes.get(model) if model else None
                if model and moved is pool and isinstance(exc, NoHealthyEndpoint) and self._may_move(model, pool):
                    # No shard of the model answers (its only one killed) while another could take it:
                    # the controller moves it once the dead shard's heartbeats stop. Wait for that.
                    self.held += 1
                    try:
                        with place_given_back():
                            moved = await self.routes.moved_from(model, pool, self._hold_s(time_remaining))
                    finally:
                        self.held -= 1
                if moved is None or moved is pool:
                    raise
                pool = moved
        return await pool.call(on)

    def _may_move(self, model: str, pool: EndpointPool[P]) -> bool:
        """Whether the fleet has a shard outside ``pool`` that ``model``'s queue could move to."""
        if self.move_hold_s <= 0 or 0 < self.max_held_calls <= self.held:
            return False
        held = {endpoint.address for endpoint in pool.endpoints}
        return any(address not in held for address in self.shards(model))

    def _hold_s(self, time_remaining: TimeRemaining) -> float:
        """How long a call may wait for its model to move: ``move_hold_s``, at most its time left."""
        left_s = time_remaining()
        return self.move_hold_s if left_s is None else max(0.0, min(self.move_hold_s, left_s))

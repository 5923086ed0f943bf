"""Who may call which model, how often: the router's API keys (no grpc).

Two kinds of key are accepted:

- **Registered keys** (``flotilla keys create``): the controller keeps their records (a salted hash,
  never the key; ``flotilla.common.apikeys``) and sends them to every router over the fleet watch,
  so a created key works, and a revoked one stops, on every router as soon as its watch hears
  (well under a second). Each has model globs, an optional rate quota and an optional expiry.
- **Static keys** (``router.api_keys``; the local stack's dev key): unscoped and unlimited, as
  before registered keys existed.

``KeyBook.authorize`` answers, in this order: no key or a malformed header, an unknown key, a
wrong secret or an expired key → ``Unauthenticated`` (one message for all, so it reveals nothing
about which); a model outside the key's globs → ``PermissionDenied`` naming the key's *name* and
the model; over the rate → ``QuotaExceeded`` with ``retry_after_s``.

**Quota across a router's processes: a per-process share.** A router of ``processes`` processes
(SO_REUSEPORT; the kernel spreads *connections*, and a channel stays on one) gives each process
a token bucket of ``rate / processes`` per second and ``burst / processes`` (at least 1) at once.
No shared state, no cross-process call on the request path. The cost is that a caller whose
connections are spread unevenly gets less than its quota: one connection reaches one process and
gets ``1/processes`` of it; k connections, spread at random over p processes, reach on average
``p * (1 - (1 - 1/p)^k)`` of them (``admitted_share``). It never gets more than its quota. Measured
with these buckets (``tests/unit/test_router_keys.py::test_quota_share_error``) and in
docs/configuration.md. Keys are not shared between router pods of a Kubernetes Deployment: each
pod enforces the whole quota (scale ``rate`` down with the pod count, or accept N times the rate).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flotilla.common.apikeys import UNKNOWN_RECORD, KeyRecord, split_key
from flotilla.common.ids import shorten
from flotilla.errors import PermissionDenied, QuotaExceeded, Unauthenticated
from flotilla.services.router.routing import ApiKeys, bearer_token

Clock = Callable[[], float]
"""Seconds, monotonic (``time.monotonic``; tests pass a fake)."""
UnixClock = Callable[[], float]
"""Seconds since the epoch (``time.time``), for expiry and last use."""

STATIC_GRANT_NAME = "static"
"""The grant name of a ``router.api_keys`` key."""


@dataclass(frozen=True)
class KeyGrant:
    """Who a call is: the key's name (``static`` for a ``router.api_keys`` key)."""

    name: str


class TokenBucket:
    """``rate_per_s`` tokens a second up to ``burst``; a request takes one.

    ``take`` answers 0 (taken) or the seconds until a token is there (nothing taken).
    """

    def __init__(self, rate_per_s: float, burst: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated_s = now_s

    def take(self, now_s: float) -> float:
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed_s * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1.0 - 1e-9:  # a refill computed in floating point may fall short by a hair
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class KeyBook:
    """The keys one router process accepts, kept equal to the fleet's (``apply``)."""

    def __init__(
        self,
        static: ApiKeys,
        *,
        processes: int = 1,
        clock: Clock,
        unix_clock: UnixClock,
    ) -> None:
        self.static = static
        self.processes = max(1, processes)
        self.clock = clock
        self.unix_clock = unix_clock
        self._by_id: dict[str, KeyRecord] = {}
        self._by_name: dict[str, KeyRecord] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.used: dict[str, float] = {}
        """Key name -> unix seconds of its last authorized call here (reported to the controller)."""

    def __len__(self) -> int:
        return len(self._by_name)

    def apply(self, records: Iterable[KeyRecord], removed: Iterable[str] = (), *, full: bool = False) -> None:
        """Add or replace ``records``, drop the keys named in ``removed`` (with ``full``: every key not
        in ``records``). A replaced key whose quota changed gets a fresh bucket."""
        records = list(records)
        gone = set(removed)
        if full:
            gone |= set(self._by_name) - {r.name for r in records}
        for name in gone:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_id.pop(old.id, None)
                self._buckets.pop(name, None)
        for record in records:
            old = self._by_name.get(record.name)
            if old is not None:
                self._by_id.pop(old.id, None)
                if (old.rate_per_s, old.burst) != (record.rate_per_s, record.burst):
                    self._buckets.pop(record.name, None)
            self._by_name[record.name] = record
            self._by_id[record.id] = record

    def authenticate(self, authorization: str | None) -> tuple[KeyGrant, KeyRecord | None]:
        """The caller's grant and record (None: a static key), or ``Unauthenticated``."""
        token = bearer_token(authorization)
        parts = split_key(token)
        if parts is not None:
            key_id, secret = parts
            record = self._by_id.get(key_id)
            # An unknown id costs the same HMAC and comparison as a wrong secret (a stand-in record).
            valid = (record or UNKNOWN_RECORD).verify(secret)
            if record is not None and valid:
                if record.expires_unix_s and self.unix_clock() >= record.expires_unix_s:
                    raise Unauthenticated("API key is not valid")  # expired: no different answer
                return KeyGrant(record.name), record
        if self.static.matches(token):
            return KeyGrant(STATIC_GRANT_NAME), None
        raise Unauthenticated("API key is not valid")

    def scope(self, authorization: str | None) -> Callable[[str], bool]:
        """Which models the caller's key may call (any, for a static key); ``Unauthenticated`` as
        ``authenticate``. Takes nothing of its quota."""
        _, record = self.authenticate(authorization)
        if record is None:
            return lambda model: True
        patterns = tuple(record.models)
        return lambda model: any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)

    def authorize(self, authorization: str | None, model: str | None) -> KeyGrant:
        """The caller's grant for one request to ``model`` (None or "": a call naming no model, e.g.
        server metadata: no scope to check), taking one token of its quota; raises as the module says."""
        grant, record = self.authenticate(authorization)
        if record is None:
            return grant
        if model and not any(fnmatch.fnmatchcase(model, pattern) for pattern in record.models):
            raise PermissionDenied(
                f"API key {record.name!r} may not call model {shorten(model, 70)!r} "
                f"(it may call: {', '.join(record.models) or 'none'})"
            )
        if record.rate_per_s > 0:
            now_s = self.clock()
            bucket = self._buckets.get(record.name)
            if bucket is None:
                share = self.processes
                bucket = TokenBucket(record.rate_per_s / share, max(1.0, record.effective_burst / share), now_s)
                self._buckets[record.name] = bucket
            wait_s = bucket.take(now_s)
            if wait_s > 0:
                raise QuotaExceeded(
                    f"API key {record.name!r} is over its quota of {record.rate_per_s:g} requests/s "
                    f"(burst {record.effective_burst}); retry in {math.ceil(wait_s * 1000)} ms",
                    retry_after_s=wait_s,
                )
        self.used[record.name] = self.unix_clock()
        return grant

    def take_used(self) -> dict[str, float]:
        """Last use of each key used since the last call (for the controller's ``keys list``)."""
        used, self.used = self.used, {}
        return used


def admitted_share(processes: int, connections: int) -> float:
    """Expected fraction of a key's quota a caller can use when its ``connections`` land uniformly at
    random on ``processes`` router processes, each holding ``1/processes`` of the quota: the share
    of processes that get at least one of its connections."""
    return 1.0 - (1.0 - 1.0 / processes) ** connections
